//! `weir bench` (being written).

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub async fn main(_args: BenchArgs) -> Result<(), BoxError> {
    Err("not yet".into())
}
