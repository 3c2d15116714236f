//! `weir demo` (being written).

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

pub async fn main(_args: DemoArgs) -> Result<(), BoxError> {
    Err("not yet".into())
}
