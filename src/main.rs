use clap::error::ErrorKind;
use clap::Parser;

fn main() {
    let cli = match cmkfs::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // Usage errors: one line, like every other error.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "cmkfs: error: {}",
                first.trim_start_matches("error: ").trim()
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = cmkfs::cli::run(cli) {
        // One line: the error and its causes, joined.
        let msg = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        eprintln!("cmkfs: error: {msg}");
        std::process::exit(1);
    }
}
