//! `weir load` (being written).

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {}

pub async fn main(_args: LoadArgs) -> Result<(), BoxError> {
    Err("not yet".into())
}
