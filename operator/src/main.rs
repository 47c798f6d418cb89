use anyhow::Context;
use clap::{Parser, Subcommand};

/// flowtel: batch workflows on Kubernetes with OpenTelemetry for every run.
#[derive(Parser)]
#[command(name = "flowtel", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRDs (WorkflowRun, TelemetryStack) as YAML.
    Crds {
        /// Write each CRD to its own file in this directory instead (the checked-in layout of crds/).
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir: None } => print!("{}", flowtel::crdgen::all_yaml()?),
        Command::Crds { out_dir: Some(dir) } => {
            for (file, crd) in flowtel::crdgen::all() {
                let path = dir.join(file);
                std::fs::write(&path, flowtel::crdgen::to_yaml(&crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
