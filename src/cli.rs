//! The command line: `confab [serve]` and `confab config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::settings::{Overrides, ENV_CONFIG_FILE};

/// confab: a self-hosted real-time chat server. Web clients connect to /ws/<room>; replicas
/// share rooms through Redis (embedded in-process bus when no Redis is configured).
///
/// Settings come from built-in defaults, then the TOML file (--config or CONFAB_CONFIG),
/// then environment variables CONFAB_<SECTION>__<KEY> (e.g. CONFAB_SERVER__LISTEN), then
/// these flags. `confab config` prints the result. See config/default.toml for every key.
#[derive(Debug, Parser)]
#[command(name = "confab", version, about, long_about)]
pub struct Cli {
    /// TOML settings file.
    #[arg(long, global = true, env = ENV_CONFIG_FILE, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on, e.g. 127.0.0.1:8080 (server.listen).
    #[arg(long, global = true, value_name = "ADDR:PORT")]
    pub listen: Option<String>,

    /// Redis URL; empty runs on the embedded bus (redis.url). redis://, rediss://,
    /// redis-sentinel://…?sentinelServiceName=…, redis-cluster://…
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Print the effective settings as TOML and exit.
    Config,
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config_file: self.config.clone(),
            listen: self.listen.clone(),
            redis_url: self.redis_url.clone(),
        }
    }
}
