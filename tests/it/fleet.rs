//! Processes beyond one Redis, for the high-availability tests: a master with a replica
//! watched by three Sentinels, a three-master Redis Cluster, and HAProxy in front of
//! replicas. Every process runs on a free loopback port, in a scratch directory of its own,
//! and is stopped when its handle is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_port, stop_child, Redis};

/// Runs `redis-cli -p port args…` and returns what it printed (trimmed).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect(
            "redis-cli not found: install it (scripts/test.sh does: apt-get install redis-tools)",
        );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Polls `check` (a blocking probe) every 100 ms until it holds or `within` passes.
pub fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < end, "{what}: not true within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub tempfile::TempDir);

impl Scratch {
    pub fn new(what: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("confab-it-{what}-"))
            .tempdir()
            .unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// A child process stopped with SIGTERM, then SIGKILL, when dropped.
pub struct Proc(Option<Child>);

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc(Some(child))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            stop_child(child);
        }
    }
}

/// The service name the Sentinels watch.
pub const SERVICE: &str = "confab-master";

/// One master, one replica, three Sentinels (quorum 2) that fail over within seconds.
pub struct SentinelSet {
    pub master: Redis,
    pub replica: Redis,
    pub sentinel_ports: Vec<u16>,
    _sentinels: Vec<Proc>,
    _dir: Scratch,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        let master = Redis::start();
        let replica = replica_of(master.port);
        let dir = Scratch::new("sentinel");
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path(&format!("sentinel-{i}.conf"));
            // Sentinel rewrites its file as it learns, so each gets its own. Down after 3 s,
            // not 1: with 1 s, a Sentinel on a loaded machine marked the master it had just
            // switched to down before its new link answered, and failed over again.
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {SERVICE} 3000\n\
                     sentinel failover-timeout {SERVICE} 5000\n\
                     sentinel parallel-syncs {SERVICE} 1\n",
                    dir = dir.0.path().display(),
                    master = master.port,
                ),
            )
            .unwrap();
            sentinels.push(Proc::spawn(
                Command::new("redis-server").arg(&conf).arg("--sentinel"),
            ));
            sentinel_ports.push(port);
        }
        // Ready when every Sentinel knows the replica and the two other Sentinels (they find
        // each other through the master's hello channel, every 2 s).
        for &port in &sentinel_ports {
            wait_until(Duration::from_secs(30), "Sentinels agree", || {
                let info = redis_cli(port, &["SENTINEL", "MASTER", SERVICE]);
                let field = |name: &str| {
                    let mut lines = info.lines();
                    lines.find(|l| l.trim() == name);
                    lines.next().map(|v| v.trim().to_owned())
                };
                field("num-other-sentinels").as_deref() == Some("2")
                    && field("num-slaves").as_deref() == Some("1")
            });
        }
        SentinelSet {
            master,
            replica,
            sentinel_ports,
            _sentinels: sentinels,
            _dir: dir,
        }
    }

    /// fred's Sentinel URL naming all three Sentinels.
    pub fn url(&self) -> String {
        let mut url = format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={SERVICE}",
            self.sentinel_ports[0]
        );
        for port in &self.sentinel_ports[1..] {
            url.push_str(&format!("&node=127.0.0.1:{port}"));
        }
        url
    }

    /// The port of the master the Sentinels name now.
    pub fn master_port(&self) -> Option<u16> {
        let reply = redis_cli(
            self.sentinel_ports[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE],
        );
        reply.lines().nth(1)?.trim().parse().ok()
    }
}

/// Arguments that make a `redis-server` replicate `master` without writing files: it loads the
/// master's data straight from the socket, and anything it would save goes to the temp dir.
pub fn replica_args(port: u16, master: u16) -> Vec<String> {
    let dir = std::env::temp_dir();
    let master = master.to_string();
    let file = format!("confab-it-replica-{port}.rdb");
    [
        "--replicaof",
        "127.0.0.1",
        master.as_str(),
        "--repl-diskless-load",
        "on-empty-db",
        "--dir",
        dir.to_str().unwrap(),
        "--dbfilename",
        file.as_str(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// A `redis-server` replicating `master`, started once its link to the master is up.
pub fn replica_of(master: u16) -> Redis {
    let port = free_port();
    let args = replica_args(port, master);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let replica = Redis::start_with(port, &args);
    wait_until(Duration::from_secs(20), "the replica syncs", || {
        redis_cli(replica.port, &["INFO", "replication"]).contains("master_link_status:up")
    });
    replica
}

/// Three masters (no replicas) made a Cluster by `redis-cli --cluster create`, which gives
/// them the slots 0–5460, 5461–10922 and 10923–16383.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    _dir: Scratch,
}

/// A `redis-server` ready to join a Cluster, with its own directory under `dir`.
fn cluster_node(dir: &Scratch, name: &str) -> Redis {
    let node_dir = dir.path(name);
    std::fs::create_dir_all(&node_dir).unwrap();
    // The bus port is chosen too: by default it is the client port + 10,000, which can be
    // another test's port (or past 65,535) when the client port is a free ephemeral one.
    let bus_port = free_port().to_string();
    Redis::start_with(
        free_port(),
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus_port,
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--dir",
            node_dir.to_str().unwrap(),
        ],
    )
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = Scratch::new("cluster");
        let nodes: Vec<Redis> = (0..3)
            .map(|i| cluster_node(&dir, &format!("n{i}")))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for node in &nodes {
            wait_until(Duration::from_secs(30), "the cluster is ok", || {
                redis_cli(node.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        RedisCluster { nodes, _dir: dir }
    }

    /// Adds a replica to master `i` and returns it once it has synced.
    pub fn add_replica(&self, i: usize) -> Redis {
        let master = &self.nodes[i];
        let replica = cluster_node(&self._dir, &format!("r{i}"));
        let id = redis_cli(master.port, &["CLUSTER", "MYID"]);
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node"])
            .arg(format!("127.0.0.1:{}", replica.port))
            .arg(format!("127.0.0.1:{}", master.port))
            .args(["--cluster-slave", "--cluster-master-id", &id])
            .output()
            .expect("redis-cli --cluster add-node");
        assert!(
            out.status.success(),
            "add-node: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        wait_until(Duration::from_secs(30), "the cluster replica syncs", || {
            redis_cli(replica.port, &["INFO", "replication"]).contains("master_link_status:up")
        });
        replica
    }

    /// fred's Cluster URL naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, node) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port));
        }
        url
    }
}

/// HAProxy on a free loopback port, balancing WebSockets over `backends` and taking a
/// replica out as soon as its `/readyz` fails.
pub struct Haproxy {
    pub port: u16,
    _proc: Proc,
    _dir: Scratch,
}

impl Haproxy {
    pub fn start(backends: &[u16]) -> Haproxy {
        let port = free_port();
        let dir = Scratch::new("haproxy");
        let mut config = format!(
            "global\n  maxconn 2000\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  \
             timeout tunnel 120s\n  retries 3\n  option redispatch\n  \
             retry-on conn-failure empty-response 503\n\
             frontend chat\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\
             backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  \
             http-check expect status 200\n  option forwardfor\n  \
             default-server inter 200ms fall 1 rise 1\n"
        );
        for (i, backend) in backends.iter().enumerate() {
            config.push_str(&format!("  server r{i} 127.0.0.1:{backend} check\n"));
        }
        let file = dir.path("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let check = Command::new("haproxy")
            .args(["-c", "-f"])
            .arg(&file)
            .output()
            .expect(
                "haproxy not found: install it (scripts/test.sh does: apt-get install haproxy)",
            );
        assert!(
            check.status.success(),
            "haproxy config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        // -db: stay in the foreground, so dropping the handle stops it.
        let proc = Proc::spawn(Command::new("haproxy").arg("-db").arg("-f").arg(&file));
        wait_until(Duration::from_secs(10), "haproxy listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Haproxy {
            port,
            _proc: proc,
            _dir: dir,
        }
    }
}
