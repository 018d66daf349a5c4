//! The operator's files in `deploy/` (README "Deployment"), held to what geoproxy really
//! accepts and exports: every YAML document under `deploy/` parses; each Kubernetes
//! ConfigMap's `geoproxy.toml` loads with geoproxy's own loader, but for what the cluster
//! supplies (passwords from a Secret); the manifests keep
//! their promises (a native sidecar on loopback and one thread, restricted Pod Security,
//! probes on the admin port, Services of ready pods); and every `geoproxy_*` metric that the
//! Prometheus rules and the Grafana dashboard use is one geoproxy exports. No cluster, no
//! Prometheus, no process: files against the config loader and the metrics registry.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use geoproxy::config::Mode;
use geoproxy::metrics::Metrics;
use geoproxy::Config;
use yaml_rust2::{Yaml, YamlLoader};

/// The image's entrypoint reads this file (deploy/Dockerfile).
const CONFIG_FILE: &str = "/etc/geoproxy/geoproxy.toml";
/// The image's user (deploy/Dockerfile `USER 10001:10001`).
const IMAGE_UID: i64 = 10001;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// Files under `dir` (recursively) whose extension is one of `extensions`, sorted.
fn files(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `path` relative to `deploy/`, for messages.
fn name(path: &Path) -> String {
    path.strip_prefix(deploy())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every document of a YAML file (a multi-document file has several).
fn documents(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", name(path)))
}

fn text<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {y:?}"))
}

/// The items of a YAML sequence; none when the key is absent.
fn items(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or_default()
}

/// Every string in a YAML tree (keys and values).
fn yaml_strings<'a>(y: &'a Yaml, out: &mut Vec<&'a str>) {
    match y {
        Yaml::String(s) => out.push(s),
        Yaml::Array(a) => a.iter().for_each(|v| yaml_strings(v, out)),
        Yaml::Hash(h) => h.iter().for_each(|(k, v)| {
            yaml_strings(k, out);
            yaml_strings(v, out);
        }),
        _ => {}
    }
}

/// Every string in a JSON tree (values, and the keys of objects).
fn json_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_strings(v, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, v)| {
            out.push(k);
            json_strings(v, out);
        }),
        _ => {}
    }
}

/// The `geoproxy_*` metric names in `s` (identifiers, not parts of longer ones).
fn metric_names(s: &str, out: &mut BTreeSet<String>) {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (at, _) in s.match_indices("geoproxy_") {
        if s[..at].chars().next_back().is_some_and(ident) {
            continue;
        }
        let rest = &s[at..];
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        out.insert(rest[..end].to_string());
    }
}

/// The names a query can use, from geoproxy's own registry with every labelled family
/// given a series: each metric's name, and a histogram's `_bucket`, `_sum` and `_count`.
fn exported_names() -> BTreeSet<String> {
    let m = Metrics::new(prometheus::Registry::new());
    m.init_members(["a", "b"]);
    m.member_up("a", true);
    m.active_member("a", true);
    m.switched("a", "b", "check:ping");
    m.passive_signals("a", "connection_lost", "confirmed", 1);
    m.check_inconclusive("a", "confirm");
    m.refusals("a", 1);
    m.check("a", "ping", 0.001, true);
    m.member_synced("a", true);
    m.replication_lag("a", "b", 0.1);
    m.failback_held("a", Some("hold"));
    m.commands("a").inc();
    m.member_drained("a", false);
    m.operation("switchover");
    m.denied("config");
    m.inflight_errors("a", 1);
    let mut names = BTreeSet::new();
    for line in m.render().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (metric, kind) = rest.split_once(' ').expect("# TYPE name kind");
        match kind {
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{metric}{suffix}"));
                }
            }
            "summary" => {
                names.insert(metric.to_string());
                for suffix in ["_sum", "_count"] {
                    names.insert(format!("{metric}{suffix}"));
                }
            }
            _ => {
                names.insert(metric.to_string());
            }
        }
    }
    names
}

/// The string values of `key = "..."` lines of a TOML text (the files here write each key
/// they use on one line).
fn toml_values(toml: &str, key: &str) -> Vec<String> {
    toml.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            if k.trim() != key {
                return None;
            }
            let v = v.trim().strip_prefix('"')?;
            Some(v[..v.find('"')?].to_string())
        })
        .collect()
}

/// `toml` with each `key = ...` line replaced by `with`.
fn toml_replace(toml: &str, key: &str, with: &str) -> String {
    toml.lines()
        .map(|line| match line.split_once('=') {
            Some((k, _)) if k.trim() == key => with,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One Kubernetes workload that runs geoproxy, with the configuration it mounts.
struct Deployed {
    file: String,
    workload: Yaml,
    /// The ConfigMap's `geoproxy.toml`, as written.
    toml: String,
    /// The mode it declares.
    mode: String,
    /// Environment variables the kubelet sets from a Secret in the geoproxy container.
    from_secrets: BTreeSet<String>,
    /// The configuration as geoproxy reads it once the Secret's passwords are set.
    config: Config,
}

impl Deployed {
    /// No member password written in the ConfigMap itself.
    fn toml_has_no_secret(&self) -> bool {
        toml_values(&self.toml, "password").is_empty()
            && toml_values(&self.toml, "token").is_empty()
    }

    fn pod(&self) -> &Yaml {
        &self.workload["spec"]["template"]["spec"]
    }

    fn geoproxy(&self) -> &Yaml {
        containers(self.pod())
            .into_iter()
            .find(|c| c["name"].as_str() == Some("geoproxy"))
            .expect("checked in deployed()")
    }
}

fn manifests() -> Vec<(String, Vec<Yaml>)> {
    let paths = files(&deploy().join("kubernetes"), &["yaml", "yml"]);
    paths.iter().map(|p| (name(p), documents(p))).collect()
}

fn of_kind<'a>(docs: &'a [Yaml], kinds: &'a [&str]) -> impl Iterator<Item = &'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| kinds.contains(&k)))
}

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];

/// A pod's containers, init containers (native sidecars among them) first.
fn containers(pod: &Yaml) -> Vec<&Yaml> {
    items(&pod["initContainers"])
        .iter()
        .chain(items(&pod["containers"]))
        .collect()
}

/// The container port named `port`.
fn port(container: &Yaml, port: &str) -> Option<i64> {
    items(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(port))
        .and_then(|p| p["containerPort"].as_i64())
}

/// Every workload of every manifest that runs a container named geoproxy, with the
/// ConfigMap it mounts at /etc/geoproxy and the configuration in it.
fn deployed() -> Vec<Deployed> {
    let mut found = Vec::new();
    for (file, docs) in manifests() {
        for workload in of_kind(&docs, WORKLOADS) {
            let pod = &workload["spec"]["template"]["spec"];
            let Some(geoproxy) = containers(pod)
                .into_iter()
                .find(|c| c["name"].as_str() == Some("geoproxy"))
            else {
                continue;
            };
            // The volume mounted where the entrypoint reads its file.
            let mount = items(&geoproxy["volumeMounts"])
                .iter()
                .find(|m| {
                    let at = m["mountPath"].as_str();
                    at == Some("/etc/geoproxy")
                        || (at == Some(CONFIG_FILE)
                            && m["subPath"].as_str() == Some("geoproxy.toml"))
                })
                .unwrap_or_else(|| panic!("{file}: geoproxy mounts nothing at {CONFIG_FILE}"));
            let volume = text(&mount["name"], "volumeMounts[].name");
            let map = items(&pod["volumes"])
                .iter()
                .find(|v| v["name"].as_str() == Some(volume))
                .map(|v| text(&v["configMap"]["name"], "volumes[].configMap.name"))
                .unwrap_or_else(|| panic!("{file}: no volume {volume}"));
            let toml = of_kind(&docs, &["ConfigMap"])
                .find(|c| c["metadata"]["name"].as_str() == Some(map))
                .map(|c| text(&c["data"]["geoproxy.toml"], "data.geoproxy.toml").to_string())
                .unwrap_or_else(|| panic!("{file}: no ConfigMap {map} with a geoproxy.toml"));
            let from_secrets: BTreeSet<String> = items(&geoproxy["env"])
                .iter()
                .filter(|e| !e["valueFrom"]["secretKeyRef"].is_badvalue())
                .map(|e| text(&e["name"], "env[].name").to_string())
                .collect();
            let modes = toml_values(&toml, "mode");
            let [mode] = modes.as_slice() else {
                panic!("{file}: {map} declares proxy.mode {} times", modes.len());
            };
            let mode = mode.clone();
            let config = load(&file, &toml, &from_secrets);
            found.push(Deployed {
                file: file.clone(),
                workload: workload.clone(),
                toml,
                mode,
                from_secrets,
                config,
            });
        }
    }
    found
}

/// Loads a ConfigMap's configuration: as written, only passwords the Secret supplies (unset
/// in this test) may be missing; with those passwords set, it is valid as it stands.
fn load(file: &str, toml: &str, from_secrets: &BTreeSet<String>) -> Config {
    if let Err(e) = Config::from_toml(toml) {
        let supplied = |p: &str| {
            from_secrets
                .iter()
                .any(|v| p.ends_with(&format!("${v} is not set")))
        };
        let unexpected: Vec<_> = e.problems.iter().filter(|p| !supplied(p)).collect();
        assert!(unexpected.is_empty(), "{file}: {unexpected:#?}");
    }
    let with_secrets = toml_replace(toml, "password_env", "password = \"from-the-secret\"");
    Config::from_toml(&with_secrets).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_yaml_document_under_deploy_parses() {
    let paths = files(&deploy(), &["yaml", "yml"]);
    let names: Vec<String> = paths.iter().map(|p| name(p)).collect();
    for required in [
        "kubernetes/sidecar.yaml",
        "kubernetes/centralized.yaml",
        "kubernetes/pooled.yaml",
        "prometheus/scrape.yml",
        "prometheus/alerts.yml",
    ] {
        assert!(names.iter().any(|n| n == required), "no deploy/{required}");
    }
    for path in &paths {
        let docs = documents(path);
        assert!(!docs.is_empty(), "{}: no YAML document", name(path));
        for (i, doc) in docs.iter().enumerate() {
            assert!(
                doc.as_hash().is_some(),
                "{} document {i}: not a mapping",
                name(path)
            );
            if name(path).starts_with("kubernetes") {
                for key in ["apiVersion", "kind"] {
                    text(&doc[key], &format!("{} document {i}: {key}", name(path)));
                }
                text(
                    &doc["metadata"]["name"],
                    &format!("{} document {i}: metadata.name", name(path)),
                );
            }
        }
    }
}

#[test]
fn each_configmap_holds_a_configuration_geoproxy_loads() {
    let deployed = deployed();
    let files: BTreeSet<&str> = deployed.iter().map(|d| d.file.as_str()).collect();
    assert_eq!(
        files,
        BTreeSet::from([
            "kubernetes/centralized.yaml",
            "kubernetes/pooled.yaml",
            "kubernetes/sidecar.yaml"
        ])
    );
    for d in &deployed {
        // Member passwords come from a Secret, through password_env.
        let vars = toml_values(&d.toml, "password_env");
        assert_eq!(vars.len(), d.config.members.len(), "{}", d.file);
        for var in &vars {
            assert!(
                d.from_secrets.contains(var),
                "{}: ${var} is not set from a Secret",
                d.file
            );
        }
        assert!(
            d.toml_has_no_secret(),
            "{}: a password in the ConfigMap",
            d.file
        );
        // The admin port is the one the probes use, and the Redis port the one Services target.
        let geoproxy = d.geoproxy();
        assert_eq!(
            port(geoproxy, "admin"),
            Some(i64::from(d.config.admin.listen.port())),
            "{}: the container port named admin is not admin.listen's",
            d.file
        );
        if let Some(redis) = port(geoproxy, "redis") {
            assert_eq!(redis, i64::from(d.config.proxy.listen.port()), "{}", d.file);
        }
        for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
            let get = &geoproxy[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{}: {probe}", d.file);
            assert_eq!(get["port"].as_str(), Some("admin"), "{}: {probe}", d.file);
        }
        // The kubelet reaches the admin port on the pod IP.
        assert!(d.config.admin.listen.ip().is_unspecified(), "{}", d.file);
    }
}

#[test]
fn the_sidecar_is_native_on_loopback_with_one_thread() {
    let all = deployed();
    let d = all
        .iter()
        .find(|d| d.file == "kubernetes/sidecar.yaml")
        .expect("sidecar.yaml runs geoproxy");
    let pod = d.pod();
    // A native sidecar (Kubernetes >= 1.29): an init container that keeps running.
    let sidecar = items(&pod["initContainers"])
        .iter()
        .find(|c| c["name"].as_str() == Some("geoproxy"))
        .expect("geoproxy is an init container");
    assert_eq!(sidecar["restartPolicy"].as_str(), Some("Always"));
    assert_eq!(
        sidecar["startupProbe"]["httpGet"]["path"].as_str(),
        Some("/live"),
        "the application starts once geoproxy listens"
    );
    let apps = items(&pod["containers"]);
    assert!(!apps.is_empty());
    assert!(apps.iter().all(|c| c["name"].as_str() != Some("geoproxy")));
    assert_eq!(d.config.proxy.mode, Mode::Colocated);
    assert_eq!(d.mode, "colocated");
    assert!(d.config.proxy.listen.ip().is_loopback());
    assert_eq!(d.config.proxy.threads, 1);
}

#[test]
fn the_shared_proxies_serve_through_a_service_of_ready_pods() {
    let manifests = manifests();
    let all = deployed();
    for (file, mode, replicas) in [
        ("kubernetes/centralized.yaml", "centralized", 2..=2),
        ("kubernetes/pooled.yaml", "pooled", 2..=i64::MAX),
    ] {
        let d = all.iter().find(|d| d.file == file).expect(file);
        assert_eq!(d.mode, mode, "{file}");
        assert!(d.config.proxy.listen.ip().is_unspecified(), "{file}");
        let n = d.workload["spec"]["replicas"].as_i64().unwrap_or(1);
        assert!(replicas.contains(&n), "{file}: {n} replicas");
        // A Service of ready pods: only proxies whose /ready says 200 get connections.
        let docs = &manifests.iter().find(|(f, _)| f == file).unwrap().1;
        let labels = d.workload["spec"]["template"]["metadata"]["labels"]
            .as_hash()
            .expect("pod labels");
        let clients = of_kind(docs, &["Service"])
            .filter(|s| s["spec"]["clusterIP"].as_str() != Some("None"))
            .find(|s| {
                s["spec"]["selector"]
                    .as_hash()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
            .unwrap_or_else(|| panic!("{file}: no Service selects the proxies"));
        assert_ne!(
            clients["spec"]["publishNotReadyAddresses"].as_bool(),
            Some(true)
        );
        assert!(
            items(&clients["spec"]["ports"])
                .iter()
                .any(|p| p["targetPort"].as_str() == Some("redis")),
            "{file}: the Service does not target the redis port"
        );
    }
    // A rollout that waits for new pods to turn ready would wait forever for a standby.
    let central = all
        .iter()
        .find(|d| d.file == "kubernetes/centralized.yaml")
        .unwrap();
    assert_eq!(
        central.workload["spec"]["updateStrategy"]["type"].as_str(),
        Some("OnDelete")
    );
}

#[test]
fn every_pod_meets_the_restricted_pod_security_standard() {
    let mut pods = 0;
    for (file, docs) in manifests() {
        for workload in of_kind(&docs, WORKLOADS) {
            pods += 1;
            let pod = &workload["spec"]["template"]["spec"];
            let ctx = &pod["securityContext"];
            for host in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(pod[host].as_bool(), Some(true), "{file}: {host}");
            }
            assert!(
                items(&pod["volumes"])
                    .iter()
                    .all(|v| v["hostPath"].is_badvalue()),
                "{file}: a hostPath volume"
            );
            for c in containers(pod) {
                let who = format!("{file}: container {:?}", c["name"]);
                let own = &c["securityContext"];
                // The container's setting, else the pod's.
                let setting = |key: &str| {
                    if own[key].is_badvalue() {
                        &ctx[key]
                    } else {
                        &own[key]
                    }
                };
                assert_eq!(setting("runAsNonRoot").as_bool(), Some(true), "{who}");
                assert_ne!(setting("runAsUser").as_i64(), Some(0), "{who}");
                assert_eq!(
                    setting("seccompProfile")["type"].as_str(),
                    Some("RuntimeDefault"),
                    "{who}"
                );
                assert_eq!(
                    own["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{who}"
                );
                assert_ne!(own["privileged"].as_bool(), Some(true), "{who}");
                assert!(
                    items(&own["capabilities"]["drop"])
                        .iter()
                        .any(|d| d.as_str() == Some("ALL")),
                    "{who}: capabilities.drop lacks ALL"
                );
                assert!(
                    items(&own["capabilities"]["add"])
                        .iter()
                        .all(|a| a.as_str() == Some("NET_BIND_SERVICE")),
                    "{who}: adds a capability"
                );
                if c["name"].as_str() == Some("geoproxy") {
                    assert_eq!(own["readOnlyRootFilesystem"].as_bool(), Some(true), "{who}");
                    assert_eq!(setting("runAsUser").as_i64(), Some(IMAGE_UID), "{who}");
                }
            }
        }
    }
    assert!(pods >= 3);
}

#[test]
fn every_metric_in_the_rules_and_the_dashboard_is_exported() {
    let exported = exported_names();
    // What the registry must give for this test to mean anything.
    for name in [
        "geoproxy_switches_total",
        "geoproxy_replication_lag_seconds",
        "geoproxy_check_duration_seconds_bucket",
    ] {
        assert!(exported.contains(name), "{name} not rendered: {exported:?}");
    }
    let mut sources: Vec<(String, BTreeSet<String>)> = Vec::new();
    for path in files(&deploy().join("prometheus"), &["yaml", "yml"]) {
        let docs = documents(&path);
        let mut strings = Vec::new();
        docs.iter().for_each(|d| yaml_strings(d, &mut strings));
        let mut used = BTreeSet::new();
        strings.iter().for_each(|s| metric_names(s, &mut used));
        sources.push((name(&path), used));
    }
    let dashboard = deploy().join("grafana/geoproxy.json");
    let json: serde_json::Value = serde_json::from_str(&read(&dashboard))
        .unwrap_or_else(|e| panic!("{}: {e}", name(&dashboard)));
    let mut strings = Vec::new();
    json_strings(&json, &mut strings);
    let mut used = BTreeSet::new();
    strings.iter().for_each(|s| metric_names(s, &mut used));
    sources.push((name(&dashboard), used));

    for (file, used) in &sources {
        let queries = file.ends_with("alerts.yml") || file.ends_with(".json");
        assert!(
            !queries || !used.is_empty(),
            "{file} uses no geoproxy metric"
        );
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics geoproxy does not export: {unknown:?}"
        );
    }
}

#[test]
fn the_alerts_answer_the_operators_questions() {
    let docs = documents(&deploy().join("prometheus/alerts.yml"));
    let rules: Vec<&Yaml> = docs
        .iter()
        .flat_map(|d| items(&d["groups"]))
        .flat_map(|g| items(&g["rules"]))
        .collect();
    for rule in &rules {
        let alert = text(&rule["alert"], "rules[].alert");
        text(&rule["expr"], alert);
        text(&rule["labels"]["severity"], alert);
        text(&rule["annotations"]["summary"], alert);
    }
    let expr = |alert: &str| {
        rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(alert))
            .map(|r| text(&r["expr"], alert).to_string())
            .unwrap_or_else(|| panic!("no alert {alert}"))
    };
    for (alert, needs) in [
        (
            "GeoproxyNoMemberAvailable",
            "geoproxy_no_member_available == 1",
        ),
        (
            "GeoproxyFailover",
            "geoproxy_switches_total{reason=~\"check:.+|passive:.+\"}",
        ),
        ("GeoproxyMemberDown", "geoproxy_member_up == 0"),
        (
            "GeoproxyReplicationLagHigh",
            "geoproxy_replication_lag_seconds >",
        ),
        (
            "GeoproxyClientTLSHandshakeFailures",
            "geoproxy_client_tls_handshake_failures_total",
        ),
        ("GeoproxyFailbackHeld", "geoproxy_failback_held == 1"),
    ] {
        assert!(expr(alert).contains(needs), "{alert}: {}", expr(alert));
    }
}

#[test]
fn the_dashboard_has_one_panel_per_question() {
    let path = deploy().join("grafana/geoproxy.json");
    let json: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
    assert!(json["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let panels = json["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id taken"
        );
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("geoproxy_"), "{title}: {expr:?}");
            assert!(
                expr.contains("$instance"),
                "{title}: ignores the proxy selector"
            );
        }
        // Panels tile the 24-column grid without overlapping.
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().expect("gridPos"));
        assert!(x + w <= 24, "{title}: wider than the grid");
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "{title}: overlaps another panel");
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Active member",
        "Member up",
        "Switches by reason",
        "Sessions open",
        "Commands/s per member",
        "In-flight errors/s",
        "Unavailable replies/s",
        "Replication lag matrix",
        "Failback held",
        "Denied commands/s",
        "Auth failures/s",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
}

#[test]
fn the_image_and_the_unit_keep_their_promises() {
    let dockerfile = read(&deploy().join("Dockerfile"));
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert!(froms.len() >= 2, "not a multi-stage build");
    for from in &froms {
        let image = from.split_whitespace().next().unwrap();
        let tag = image.split_once(':').map(|(_, t)| t).unwrap_or("latest");
        assert!(
            tag.chars().any(|c| c.is_ascii_digit()),
            "{image}: pin the base image by an exact version tag"
        );
    }
    for needed in [
        "--locked",
        "USER 10001:10001",
        "EXPOSE 6380 9380",
        &format!("ENTRYPOINT [\"/usr/local/bin/geoproxy\", \"--config\", \"{CONFIG_FILE}\"]"),
    ] {
        assert!(
            dockerfile.contains(needed),
            "deploy/Dockerfile lacks {needed:?}"
        );
    }
    assert!(!dockerfile.lines().any(|l| l.starts_with("HEALTHCHECK")));

    let unit = read(&deploy().join("systemd/geoproxy.service"));
    for needed in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "--check",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(needed), "geoproxy.service lacks {needed:?}");
    }
}

#[test]
fn the_readme_names_only_deploy_files_that_exist() {
    let readme = read(&root().join("README.md"));
    let mut named = BTreeSet::new();
    for (at, _) in readme.match_indices("deploy/") {
        if readme[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &readme[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
            .unwrap_or(rest.len());
        named.insert(rest[..end].trim_end_matches('.').to_string());
    }
    assert!(named.len() >= 6, "{named:?}");
    for path in &named {
        assert!(
            root().join(path).exists(),
            "README.md names {path}, which does not exist"
        );
    }
    assert!(named.contains("deploy/Dockerfile"), "{named:?}");
}
