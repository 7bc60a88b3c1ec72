//! The Kubernetes manifests (`build/k8s/`), rendered with `kubectl kustomize` as a user would,
//! checked against the services themselves: the probes are each role's own routes on its own
//! port, every `HERALD__…` variable is a configuration key `herald config check` accepts with
//! the values the pod gets, and the grace period outlasts the role's stop wait. (Schema
//! validation is `build/k8s-check.sh`, offline with `kubernetes-validate`.)

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;

use crate::helpers::{herald, repo_root};

/// The rendered objects of `overlay`.
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo_root().join("build/k8s/overlays").join(overlay);
    let output = Command::new("kubectl")
        .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
        .arg(&dir)
        .output()
        .expect("kubectl runs (it is installed on the project's machines)");
    assert!(
        output.status.success(),
        "{overlay}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

fn role_of(deployment: &Value) -> Option<&'static str> {
    match deployment["metadata"]["name"].as_str()? {
        "herald-messenger-api" => Some("messenger-api"),
        "herald-job-scheduler" => Some("job-scheduler"),
        _ => None,
    }
}

/// The variables a container gets, with secrets given stand-in values of the right kind.
fn variables(container: &Value, secrets: &HashMap<String, String>) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = match (&var["value"], &var["valueFrom"]["secretKeyRef"]["key"]) {
            (Value::String(v), _) => v.clone(),
            (_, Value::String(key)) => secrets.get(key).cloned().unwrap_or_else(|| match key.as_str() {
                "mongo-uri" => "mongodb://db.example:27017/?replicaSet=rs0&w=majority".into(),
                "redis-url" => "redis://cache.example:6379".into(),
                _ => format!("operator-supplied-{key}"),
            }),
            other => panic!("{name}: {other:?}"),
        };
        vars.insert(name, value);
    }
    vars
}

#[test]
fn every_overlay_renders_and_matches_the_services_it_deploys() {
    for overlay in ["local", "production"] {
        let objects = render(overlay);
        let secrets: HashMap<String, String> = objects
            .iter()
            .filter(|o| o["kind"] == "Secret")
            .flat_map(|o| o["data"].as_object().cloned().unwrap_or_default())
            .map(|(k, v)| {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap())
                    .unwrap();
                (k, String::from_utf8(bytes).unwrap())
            })
            .collect();
        let deployments: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Deployment" && role_of(o).is_some())
            .collect();
        assert_eq!(deployments.len(), 2, "{overlay}: both roles deployed");
        for deployment in deployments {
            let role = role_of(deployment).unwrap();
            let pod = &deployment["spec"]["template"]["spec"];
            let container = &pod["containers"][0];
            assert_eq!(container["args"][0], role, "{overlay}: {role} runs its role");
            let (port, prefix) = match role {
                "messenger-api" => (3000, "/messenger"),
                _ => (3001, "/job-scheduler"),
            };
            assert_eq!(container["ports"][0]["containerPort"], port, "{overlay} {role}");
            assert_eq!(
                container["livenessProbe"]["httpGet"]["path"],
                format!("{prefix}/health")
            );
            assert_eq!(
                container["readinessProbe"]["httpGet"]["path"],
                format!("{prefix}/ready")
            );
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{overlay} {role}");
            assert_eq!(security["allowPrivilegeEscalation"], false);
            assert_eq!(security["capabilities"]["drop"][0], "ALL");
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert!(container["resources"]["limits"]["memory"].is_string());

            // Every variable is a key the binary knows, and the whole loads and validates.
            let vars = variables(container, &secrets);
            assert!(
                vars.values().all(|v| !v.contains('\n')),
                "{overlay} {role}: one-line values"
            );
            let mut check = herald(&vars);
            let output = check
                .args(["config", "check"])
                .env("HERALD_CONFIG_DIR", repo_root().join("configs"))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{overlay} {role}: herald config check refused the pod's variables: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let printed = String::from_utf8_lossy(&output.stdout);
            assert!(
                printed.contains(&format!("port = {port}")),
                "{overlay} {role}: {printed}"
            );

            // The doctor runs first, with exactly the role's configuration and mounts.
            let doctor = &pod["initContainers"][0];
            assert_eq!(doctor["args"][0], "doctor", "{overlay} {role}: herald doctor first");
            assert_eq!(doctor["image"], container["image"], "{overlay} {role}");
            assert_eq!(
                variables(doctor, &secrets),
                vars,
                "{overlay} {role}: the doctor checks what the role uses"
            );
            assert_eq!(doctor["volumeMounts"], container["volumeMounts"], "{overlay} {role}");
            assert_eq!(doctor["securityContext"]["readOnlyRootFilesystem"], true);
            if overlay == "production" {
                assert_eq!(
                    vars["HERALD__REDIS__MODE"], "sentinel",
                    "production follows a Sentinel-watched master"
                );
                assert!(printed.contains("mode = \"sentinel\""), "{printed}");
            }

            // The grace period outlasts the stop wait: lease + longest send + 10 s.
            let lease = toml_value(&printed, "lease_seconds");
            let send_ms = toml_value_in(&printed, "[webhook]", "timeout_ms");
            let stop_wait = lease + send_ms.div_ceil(1000) + 10;
            let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
            assert!(
                grace > stop_wait,
                "{overlay} {role}: grace {grace} s does not outlast the stop wait {stop_wait} s"
            );
        }
        // Only the API reaches the scheduler's control port.
        let policy = objects
            .iter()
            .find(|o| o["kind"] == "NetworkPolicy")
            .expect("a network policy");
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "herald-job-scheduler"
        );
        let from = &policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"];
        assert_eq!(from["app.kubernetes.io/name"], "herald-messenger-api");
        assert_eq!(policy["spec"]["ingress"].as_array().unwrap().len(), 1);
        // Production holds no secret: it is referenced by name only.
        if overlay == "production" {
            assert!(secrets.is_empty(), "production must not inline a secret");
        }
    }
}

/// The first `key = n` in the printed TOML.
fn toml_value(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not printed"))
}

/// `key = n` within `section` of the printed TOML.
fn toml_value_in(text: &str, section: &str, key: &str) -> u64 {
    let start = text.find(section).unwrap_or_else(|| panic!("{section} not printed"));
    toml_value(&text[start..], key)
}
