use clap::Parser;

fn main() {
    let cli = cmkfs::cli::Cli::parse();
    if let Err(e) = cmkfs::cli::run(cli) {
        // One line: the error and its causes, joined.
        let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
        eprintln!("cmkfs: error: {msg}");
        std::process::exit(1);
    }
}
