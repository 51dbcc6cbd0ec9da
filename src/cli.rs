//! The command line: `confab [serve]`, `confab config`, `confab token` and `confab migrate`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::TokenRequest;
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

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Print the effective settings as TOML and exit.
    Config,
    /// Print a JWT for one user, signed with the configured HS256 secret (auth.jwt_secret),
    /// with the configured audience and issuer: for trying auth out, and for scripts.
    Token(TokenArgs),
    /// Create or migrate the store's schema (store.url) and exit; `serve` also does this at
    /// start. Fails, naming both versions, on a database migrated by a newer confab.
    Migrate,
}

/// `confab token`'s claims.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user (`sub`): letters, digits, '_', '-', '.'; up to 32 characters.
    #[arg(long)]
    pub sub: String,
    /// Display name shown with the user's messages.
    #[arg(long)]
    pub name: Option<String>,
    /// Rooms the user may join, as comma-separated globs (`*`, `?`), e.g. 'team-*,lobby';
    /// absent = every room.
    #[arg(long, value_delimiter = ',')]
    pub rooms: Option<Vec<String>>,
    /// Rooms the user may post in, as globs; absent = wherever they may join.
    #[arg(long, value_delimiter = ',')]
    pub publish: Option<Vec<String>>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl_secs: u64,
}

impl TokenArgs {
    pub fn request(&self) -> TokenRequest {
        let globs = |l: &Option<Vec<String>>| {
            l.as_ref().map(|l| {
                l.iter()
                    .map(|g| g.trim().to_owned())
                    .filter(|g| !g.is_empty())
                    .collect()
            })
        };
        TokenRequest {
            sub: self.sub.clone(),
            name: self.name.clone(),
            rooms: globs(&self.rooms),
            publish: globs(&self.publish),
            ttl: Duration::from_secs(self.ttl_secs),
        }
    }
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
