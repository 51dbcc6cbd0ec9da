use std::process::ExitCode;

use clap::Parser;
use confab::cli::{Cli, Command};
use confab::settings::Settings;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let settings = match Settings::load(&cli.overrides(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("confab: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.clone().unwrap_or(Command::Serve) {
        Command::Token(args) => match confab::auth::sign_hs256(&settings.auth, &args.request()) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("confab token: {e}");
                ExitCode::from(2)
            }
        },
        Command::Migrate => {
            match actix_web::rt::System::new().block_on(confab::startup::migrate(&settings)) {
                Ok(done) => {
                    eprintln!("confab migrate: {done}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("confab migrate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config => {
            print!("{}", settings.to_toml());
            ExitCode::SUCCESS
        }
        Command::Serve => {
            match actix_web::rt::System::new().block_on(confab::startup::run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("confab: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
