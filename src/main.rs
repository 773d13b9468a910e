//! The `katalite` command line: parses arguments, calls the libraries, reports errors.
//! Exit codes follow `docker run`: the workload's own, or 125 when katalite fails.

mod attach;
mod boot;
mod cli;
mod confine;
mod embedded;
mod engine_net;
mod exec;
mod guest_root;
mod guest_text;
mod hardening;
mod image_cmds;
mod lifecycle;
mod network;
mod run;
mod runc;
mod signals;
mod spec;
mod stdio;
mod terminal;
mod volumes;

use clap::Parser;

/// What `docker run` returns when the runtime itself fails.
const EXIT_KATALITE_FAILED: u8 = 125;
/// What Docker's CLI returns when a container command (`ps`, `stop`...) fails.
const EXIT_COMMAND_FAILED: u8 = 1;

fn main() -> std::process::ExitCode {
    // The engines start the same binary under the runtime's own names.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let program = args
        .first()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name);
    // The shim's daemon gets its listening socket from its own `start` as fd 3.
    let shim_daemon = program.is_some_and(|name| name == katalite_shim::PROGRAM)
        && katalite_shim::is_daemon(&args);
    if let Err(err) = hardening::at_start(if shim_daemon { 4 } else { 3 }) {
        eprintln!("katalite: {err:#}");
        return std::process::ExitCode::from(EXIT_KATALITE_FAILED);
    }
    if program.is_some_and(|name| name == runc::PROGRAM) {
        return runc::main(args);
    }
    if program.is_some_and(|name| name == katalite_shim::PROGRAM) {
        return katalite_shim::main(args);
    }
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("katalite: {}", cli::one_line(&err));
            return std::process::ExitCode::from(EXIT_KATALITE_FAILED);
        }
    };
    use lifecycle::commands;
    let failure = match &cli.command {
        cli::Command::Run(_)
        | cli::Command::Pull(_)
        | cli::Command::Images(_)
        | cli::Command::Rmi(_)
        | cli::Command::Supervise(_) => EXIT_KATALITE_FAILED,
        _ => EXIT_COMMAND_FAILED,
    };
    let result = match &cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Pull(args) => image_cmds::pull(args).map(|()| 0),
        cli::Command::Images(args) => image_cmds::images(args).map(|()| 0),
        cli::Command::Rmi(args) => image_cmds::rmi(args).map(|()| 0),
        cli::Command::Exec(args) => exec::client::exec(args),
        cli::Command::Ps(args) => commands::ps(args),
        cli::Command::Logs(args) => commands::logs(args),
        cli::Command::Stop(args) => commands::stop(args),
        cli::Command::Kill(args) => commands::kill(args),
        cli::Command::Rm(args) => commands::rm(args),
        cli::Command::Inspect(args) => commands::inspect(args),
        cli::Command::Wait(args) => commands::wait(args),
        cli::Command::Supervise(args) => commands::supervise(args),
        cli::Command::Volume(args) => volumes::commands::volume(args),
        cli::Command::InstallRuntime(args) => runc::install::install(args),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(err) => {
            eprintln!("katalite: {err:#}");
            std::process::ExitCode::from(failure)
        }
    }
}
