use clap::error::ErrorKind;
use clap::Parser;

/// Every freed heap block is zeroed: libraries (TLS, HTTP, JSON) buffer DEKs and tokens on
/// their own, and freed memory must not keep them (see `crypto::secret`).
#[global_allocator]
static ALLOC: cmkfs::crypto::secret::ZeroizingAlloc = cmkfs::crypto::secret::ZeroizingAlloc;

fn main() {
    // Before anything creates a file: state is private whatever umask we were started with.
    cmkfs::process::private_umask();
    if let Err(e) = cmkfs::process::forbid_core_dumps() {
        eprintln!("cmkfs: error: cannot disable core dumps: {e}");
        std::process::exit(1);
    }
    // Help and usage errors go to a pipe too (`cmkfs --help | head`); daemons turn SIGPIPE
    // back off below.
    cmkfs::process::default_sigpipe();
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
    if !cli.quiet_on_closed_pipe() {
        cmkfs::process::ignore_sigpipe();
    }
    cmkfs::process::ignore_file_size_signal();
    if let Err(e) = cmkfs::cli::run(cli) {
        // One line: the error and its causes, joined; a cause an error's own message already
        // shows (`{path}: {source}`) is said once.
        let mut msg = String::new();
        for c in e.chain() {
            let c = c.to_string();
            if msg.contains(&c) {
                continue;
            }
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&c);
        }
        eprintln!("cmkfs: error: {msg}");
        std::process::exit(1);
    }
}
