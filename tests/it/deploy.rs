//! What ships for deployment, checked offline: the Kubernetes manifests (`config/k8s/`)
//! against the Kubernetes schemas and checkov's security checks, their promises (probes,
//! drain budget, posture, settings that exist), and the Dockerfile with hadolint and against
//! the workspace's manifests.
//!
//! The linters come from PyPI into a virtualenv that `scripts/tools.sh` makes (`scripts/test.sh`
//! runs it and exports `DEPLOY_TOOLS_BIN`). A missing linter fails the test; it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default
/// from 1.30) and the newest whose schemas the validator bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// How a value the operator must set starts in the shipped manifests.
const PLACEHOLDER: &str = "SET-ME";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    root().join("config/k8s")
}

/// Where the linters are: `DEPLOY_TOOLS_BIN`, else the virtualenv `scripts/tools.sh` makes
/// under Cargo's target directory.
fn tools_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("DEPLOY_TOOLS_BIN") {
        return PathBuf::from(dir);
    }
    // CARGO_BIN_EXE_confab is <target>/<profile>/confab.
    let exe = Path::new(env!("CARGO_BIN_EXE_confab"));
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    target.join("tools-venv/bin")
}

fn tool(name: &str) -> Command {
    let path = tools_bin().join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/tools.sh (scripts/test.sh does) to install the deploy \
         linters, or point DEPLOY_TOOLS_BIN at a directory that has them",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.current_dir(root());
    cmd
}

fn run(mut cmd: Command) -> (Output, String) {
    let out = cmd.output().expect("run linter");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Every manifest file, as `kustomization.yaml` lists it.
fn listed_manifests() -> Vec<String> {
    let kustomization = yaml(&k8s_dir().join("kustomization.yaml"));
    kustomization[0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_owned())
        .collect()
}

/// A YAML file's documents as JSON, read with the PyYAML the linters' virtualenv carries.
fn yaml(path: &Path) -> Vec<Value> {
    let mut cmd = tool("python");
    cmd.args([
        "-c",
        "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
    ])
    .arg(path);
    let (out, text) = run(cmd);
    assert!(out.status.success(), "{}: {text}", path.display());
    serde_json::from_slice(&out.stdout).expect("JSON from PyYAML")
}

/// Every object of every listed manifest.
fn objects() -> Vec<Value> {
    listed_manifests()
        .iter()
        .flat_map(|f| yaml(&k8s_dir().join(f)))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in config/k8s"))
}

#[test]
fn kustomization_lists_every_manifest_in_the_folder() {
    let mut on_disk: Vec<String> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml" && !n.starts_with('.'))
        .collect();
    on_disk.sort();
    let mut listed = listed_manifests();
    listed.sort();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml resources vs config/k8s/*.yaml"
    );
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = listed_manifests()
        .iter()
        .map(|f| k8s_dir().join(f))
        .collect();
    for version in KUBERNETES_VERSIONS {
        let mut cmd = tool("kubernetes-validate");
        // --strict: an unknown or misspelt field is an error, not silently ignored.
        cmd.args(["--strict", "--kubernetes-version", version])
            .args(&files);
        let (out, text) = run(cmd);
        assert!(
            out.status.success(),
            "kubernetes-validate {version}:\n{text}"
        );
        let passed = text.matches(" passed for resource ").count();
        assert!(passed >= files.len(), "validated too little:\n{text}");
    }
}

#[test]
fn the_manifests_pass_checkov_with_every_skip_justified() {
    let config = k8s_dir().join(".checkov.yaml");
    let skips = std::fs::read_to_string(&config).unwrap();
    for line in skips
        .lines()
        .filter(|l| l.trim_start().starts_with("- CKV"))
    {
        let why = line.split_once('#').map(|(_, w)| w.trim()).unwrap_or("");
        assert!(
            why.len() > 20,
            "every skipped check says why on its line: {line}"
        );
    }
    let mut cmd = tool("checkov");
    cmd.arg("-d")
        .arg(k8s_dir())
        .arg("--config-file")
        .arg(&config)
        .args(["--skip-download", "--compact", "--quiet", "-o", "json"]);
    let (out, text) = run(cmd);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("checkov printed no JSON ({e}):\n{text}"));
    let summary = &report["summary"];
    assert_eq!(summary["failed"], 0, "checkov failures:\n{text}");
    assert!(
        summary["passed"].as_u64().unwrap_or(0) > 50,
        "checkov checked too little: {summary}"
    );
    assert!(out.status.success(), "checkov exit status:\n{text}");
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let mut cmd = tool("hadolint");
    cmd.arg("Dockerfile");
    let (out, text) = run(cmd);
    assert!(out.status.success(), "hadolint:\n{text}");
}

/// The target paths a manifest names (each `[[bin]]`, `[[test]]`, `[[bench]]`, `[[example]]`,
/// with Cargo's default path when it gives none): they must exist for the manifest to load.
fn named_targets(manifest: &toml::Table) -> Vec<String> {
    let kinds = [
        ("bin", "src/bin"),
        ("test", "tests"),
        ("bench", "benches"),
        ("example", "examples"),
    ];
    let mut paths = Vec::new();
    for (kind, dir) in kinds {
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let name = target["name"].as_str().expect("target name");
            paths.push(match target.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_owned(),
                None => format!("{dir}/{name}.rs"),
            });
        }
    }
    paths
}

/// No Docker engine runs in CI, so nothing else would notice a workspace member or a target
/// the image's dependency layer does not stand in for: there Cargo loads every member's
/// manifest, with only stub targets, before any source is copied.
#[test]
fn the_dockerfile_stands_in_for_every_workspace_member_and_target_its_manifests_name() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let tokens: Vec<&str> = dockerfile.split_whitespace().collect();
    let read = |dir: &Path| -> toml::Table {
        let text = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        text.parse().unwrap()
    };
    let manifest = read(&root());
    let members: Vec<&str> = manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .map(|m| m.as_str().expect("member path"))
        .collect();
    assert!(!members.is_empty(), "the root is a workspace with members");
    let mut packages = vec![(String::new(), manifest.clone())];
    for member in &members {
        let copy = format!("{member}/Cargo.toml");
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("COPY ") && l.contains(&copy)),
            "the Dockerfile copies {copy} before its first build"
        );
        packages.push((format!("{member}/"), read(&root().join(member))));
    }
    for (prefix, manifest) in &packages {
        for path in named_targets(manifest) {
            let path = format!("{prefix}{path}");
            assert!(
                tokens.contains(&path.as_str()),
                "the Dockerfile's dependency layer stubs {path}"
            );
        }
    }
}

#[test]
fn the_image_runs_as_the_user_and_port_the_deployment_expects() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let objects = objects();
    let deployment = find(&objects, "Deployment", "confab");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let user = pod["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim() == format!("USER {user}:{user}")),
        "the image's USER is the pod's runAsUser {user}"
    );
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(dockerfile.contains(&format!("EXPOSE {port}")));
    let runtime = dockerfile
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .unwrap();
    assert!(
        runtime.contains("distroless"),
        "slim runtime with no shell: {runtime}"
    );
    assert!(
        dockerfile.contains("ENTRYPOINT [\""),
        "exec form: no shell needed to start"
    );
}

#[test]
fn the_deployment_keeps_its_promises() {
    let objects = objects();
    let deployment = find(&objects, "Deployment", "confab");
    let config = find(&objects, "ConfigMap", "confab");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");

    // The kubelet's SIGKILL must not cut the drain short.
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("preStop sleep");
    let drain: u64 = config["data"]["CONFAB_SERVER__SHUTDOWN_GRACE_SECS"]
        .as_str()
        .expect("the drain budget is set in the ConfigMap")
        .parse()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace >= pre_stop + drain + 5,
        "terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain {drain} + 5"
    );

    for what in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][what][resource].is_string(),
                "resources.{what}.{resource}"
            );
        }
    }
    assert!(pod["topologySpreadConstraints"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["runAsNonRoot"], true);

    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let env = container["env"].as_array().expect("env");
    let var = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("env {name}"))
    };
    assert_eq!(
        var("CONFAB_SERVER__NODE_ID")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name",
        "the node id is the pod's name"
    );
    for secret in ["CONFAB_AUTH__JWT_SECRET", "CONFAB_API__KEY"] {
        assert!(
            var(secret)["valueFrom"]["secretKeyRef"]["name"].is_string(),
            "{secret} comes from a Secret"
        );
    }

    let selector = &spec["selector"]["matchLabels"];
    let service = find(&objects, "Service", "confab");
    assert_eq!(&service["spec"]["selector"], selector);
    let pdb = find(&objects, "PodDisruptionBudget", "confab");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    let hpa = find(&objects, "HorizontalPodAutoscaler", "confab");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "confab");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 3);
}

#[test]
fn the_config_map_and_the_deployment_set_only_settings_confab_accepts() {
    let objects = objects();
    let config = find(&objects, "ConfigMap", "confab");
    let data = config["data"].as_object().expect("data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    cmd.arg("config").env_remove("CONFAB_CONFIG");
    let mut settings = 0;
    for (key, value) in data {
        if key.starts_with("CONFAB_") {
            let value = value.as_str().expect("ConfigMap values are strings");
            // A value the operator must set (see the test below) stands in as an address.
            let value = if value.starts_with(PLACEHOLDER) {
                "192.0.2.1"
            } else {
                value
            };
            cmd.env(key, value);
            settings += 1;
        }
    }
    assert!(settings >= 4, "{data:?}");
    // The Deployment's own variables (node id, secrets), with stand-in values.
    let deployment = find(&objects, "Deployment", "confab");
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env");
    for var in env {
        let name = var["name"].as_str().unwrap();
        if name == "CONFAB_STORE__URL" {
            cmd.env(
                name,
                "postgres://confab:stand-in@confab-postgres:5432/confab",
            );
        } else if name.ends_with("__URL") {
            cmd.env(name, "redis://:stand-in@confab-redis:6379");
        } else if name.starts_with("CONFAB_") {
            cmd.env(name, "stand-in-value-0123456789abcdef0123456789abcdef");
        }
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "confab refuses the manifests' settings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn only_the_ingress_is_trusted_and_admitted_and_a_forgotten_value_is_obvious() {
    let objects = objects();
    let config = find(&objects, "ConfigMap", "confab");
    let trusted = config["data"]["CONFAB_SERVER__TRUSTED_PROXIES"]
        .as_str()
        .expect("the ConfigMap names the trusted proxies");
    // Whole private ranges would let any pod or office machine name its own address. The
    // shipped value is a placeholder confab refuses at start, naming the key, so a
    // deployment that forgot it fails at once rather than trusting too much or too little.
    let out = Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("config")
        .env_remove("CONFAB_CONFIG")
        .env("CONFAB_SERVER__TRUSTED_PROXIES", trusted)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        trusted.starts_with(PLACEHOLDER)
            && !out.status.success()
            && err.contains("server.trusted_proxies"),
        "server.trusted_proxies must ship as a placeholder confab refuses, not `{trusted}`: {err}"
    );

    let policy = find(&objects, "NetworkPolicy", "confab");
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    assert!(
        !rules.is_empty(),
        "an empty list would admit nothing at all"
    );
    for rule in rules {
        let from = rule["from"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(
            !from.is_empty(),
            "a rule without `from` admits every source: {rule}"
        );
        for peer in from {
            let namespace =
                &peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"];
            assert!(
                namespace
                    .as_str()
                    .is_some_and(|n| n.starts_with(PLACEHOLDER)),
                "each source is one namespace the operator names: {peer}"
            );
        }
    }
}

#[test]
fn the_trial_redis_needs_the_password_confab_gets_and_never_evicts() {
    let objects = objects();
    let redis = find(&objects, "Deployment", "confab-redis");
    let container = &redis["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string args"))
        .collect();
    let after = |flag: &str| {
        let at = args.iter().position(|a| *a == flag)?;
        args.get(at + 1).copied()
    };
    assert_eq!(
        after("--maxmemory-policy"),
        Some("noeviction"),
        "history is never evicted silently: {args:?}"
    );
    assert!(
        after("--maxmemory").is_some_and(|m| m != "0"),
        "a memory bound: {args:?}"
    );
    let password = after("--requirepass").expect("a password");
    let variable = password
        .strip_prefix("$(")
        .and_then(|p| p.strip_suffix(')'))
        .unwrap_or_else(|| panic!("the password comes from a variable: {password}"));
    let secret_of = |container: &Value, name: &str| {
        let var = container["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == name))
            .unwrap_or_else(|| panic!("env {name}"));
        var["valueFrom"]["secretKeyRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} comes from a Secret"))
            .to_owned()
    };
    let confab = find(&objects, "Deployment", "confab");
    assert_eq!(
        secret_of(
            &confab["spec"]["template"]["spec"]["containers"][0],
            "CONFAB_REDIS__URL"
        ),
        secret_of(container, variable),
        "confab's Redis URL and Redis's password come from the same Secret"
    );
    let config = find(&objects, "ConfigMap", "confab");
    assert!(
        config["data"]["CONFAB_REDIS__URL"].is_null(),
        "the URL carries the password: not in the ConfigMap"
    );
    let text = std::fs::read_to_string(k8s_dir().join("redis-trial.yaml")).unwrap();
    assert!(text.contains("NOT FOR PRODUCTION"));
}
