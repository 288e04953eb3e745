//! The deployment files in `deploy/` hold together: every YAML file parses, the
//! router.toml files validate with the router's own configuration code (with
//! the environment the deployment gives them), the Kubernetes objects point at
//! each other correctly (ports, probes, labels, volumes, Secret keys), shutdown
//! is given longer than the drain, and the Dockerfile builds what the Makefile
//! builds and runs it the way the other files expect.
//!
//! Nothing here builds or runs an image: it reads the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;
use switchboard::config::{KvBackend, QueueType, RouterConfig};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML file (`---`-separated).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .collect()
}

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            found.push(path);
        }
    }
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value:?}"))
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text:?} is not a duration: {e}"))
}

/// The value following `flag` in an argument list.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn strings(value: &Value, what: &str) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {value:?}"))
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("{what}: unexpected item {other:?}"),
        })
        .collect()
}

/// A router.toml as the router would run it: parsed, with `env` applied as its
/// environment, validated. Relative paths are left as written.
fn router_config(text: &str, what: &str, env: &BTreeMap<String, String>) -> RouterConfig {
    let mut config: RouterConfig =
        toml::from_str(text).unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    config.apply_env(|name| env.get(name).cloned());
    if let Err(errors) = config.validate() {
        panic!("{what} is not valid:\n  {}", errors.join("\n  "));
    }
    config
}

fn shipped_router_toml() -> RouterConfig {
    router_config(
        &read(&repo().join("router.toml")),
        "router.toml",
        &BTreeMap::new(),
    )
}

/// The seed plugins, as the Makefile's `PLUGINS` names them.
fn makefile_plugins() -> BTreeSet<String> {
    let makefile = read(&repo().join("Makefile"));
    let line = makefile
        .lines()
        .find_map(|l| l.strip_prefix("PLUGINS"))
        .expect("the Makefile names its PLUGINS");
    let names = line.trim_start().trim_start_matches([':', '?', '=']);
    names.split_whitespace().map(String::from).collect()
}

/// A deployed router.toml runs the seed plugins as the shipped one does: same
/// exchanges, plugins (with their merged settings) and routes; on RabbitMQ with
/// quorum queues and plugin state in Redis.
fn assert_like_shipped_on_rabbitmq_and_redis(config: &RouterConfig, what: &str) {
    let shipped = shipped_router_toml();
    let mut same_dir = config.clone();
    same_dir.plugins_dir = shipped.plugins_dir.clone();
    let names: BTreeSet<String> = config.plugins.keys().cloned().collect();
    assert_eq!(
        names,
        makefile_plugins(),
        "{what}: runs the seed plugins the image ships"
    );
    for name in &names {
        assert_eq!(
            same_dir.plugin_settings(name),
            shipped.plugin_settings(name),
            "{what}: plugin {name} differs from router.toml's (update the deploy copies with it)"
        );
    }
    assert_eq!(
        config.routes, shipped.routes,
        "{what}: routes differ from router.toml's"
    );
    let exchanges = |c: &RouterConfig| {
        c.exchanges
            .iter()
            .map(|e| (e.name.clone(), e.kind, e.durable))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        exchanges(config),
        exchanges(&shipped),
        "{what}: exchanges differ from router.toml's"
    );
    assert!(config.broker.url.is_some(), "{what}: runs on RabbitMQ");
    assert_eq!(config.broker.queue_type, QueueType::Quorum, "{what}");
    assert_eq!(
        config.kv.backend,
        KvBackend::Redis,
        "{what}: replicas share plugin state"
    );
    assert!(config.redis_settings().is_some(), "{what}");
}

// --- Kubernetes ---------------------------------------------------------------

struct K8s {
    objects: Vec<(PathBuf, Value)>,
}

impl K8s {
    fn load() -> Self {
        let mut files = Vec::new();
        yaml_files(&deploy().join("k8s"), &mut files);
        let objects = files
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n != "kustomization.yaml"))
            .flat_map(|f| {
                yaml_documents(&f)
                    .into_iter()
                    .filter(|d| !d.is_null())
                    .map(move |d| (f.clone(), d))
            })
            .collect();
        Self { objects }
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self
            .objects
            .iter()
            .map(|(_, o)| o)
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect();
        assert_eq!(found.len(), 1, "exactly one {kind} in deploy/k8s");
        found[0]
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn pod(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod()["containers"].as_sequence().unwrap();
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some("switchboard"))
            .expect("a container named switchboard")
    }

    fn args(&self) -> Vec<String> {
        strings(&self.container()["args"], "container args")
    }

    /// The environment the container gets: literal values, and Secret keys
    /// resolved from the Secret in deploy/k8s.
    fn env(&self) -> BTreeMap<String, String> {
        let secret = self.one("Secret");
        let secret_name = str_of(&secret["metadata"]["name"], "Secret name");
        let mut env = BTreeMap::new();
        for var in self.container()["env"].as_sequence().unwrap() {
            let name = str_of(&var["name"], "env name").to_string();
            let value = if let Some(v) = var["value"].as_str() {
                v.to_string()
            } else {
                let key_ref = &var["valueFrom"]["secretKeyRef"];
                assert_eq!(
                    str_of(&key_ref["name"], "secretKeyRef.name"),
                    secret_name,
                    "{name}: from the shipped Secret"
                );
                let key = str_of(&key_ref["key"], "secretKeyRef.key");
                str_of(&secret["stringData"][key], key).to_string()
            };
            env.insert(name, value);
        }
        env
    }

    /// A probe's or the Service's port, resolved to the container port number.
    fn container_port(&self, port: &Value) -> u64 {
        let ports = self.container()["ports"].as_sequence().unwrap();
        let found = match port {
            Value::Number(n) => ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == n.as_u64()),
            Value::String(name) => ports
                .iter()
                .find(|p| p["name"].as_str() == Some(name.as_str())),
            other => panic!("not a port: {other:?}"),
        };
        found
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("port {port:?} is not a port of the container"))
    }

    /// Where the volume that backs `path` in the container comes from.
    fn volume_at(&self, path: &Path) -> &Value {
        let mount = self.container()["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str().map(Path::new) == Some(path))
            .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
        let name = str_of(&mount["name"], "volumeMount name");
        self.pod()["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The ConfigMap's router.toml with the pods' environment, the Secret's
    /// placeholder token replaced by a real one (as the README asks).
    fn router_config(&self) -> RouterConfig {
        let map = self.one("ConfigMap");
        let text = str_of(&map["data"]["router.toml"], "ConfigMap router.toml");
        let mut env = self.env();
        env.insert(
            "SWITCHBOARD_ADMIN_TOKEN".into(),
            "0123456789abcdef0123456789abcdef".into(),
        );
        router_config(text, "the ConfigMap's router.toml", &env)
    }
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        str_of(k, "label").to_string(),
                        str_of(v, "label value").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| f.strip_prefix(deploy()).unwrap().display().to_string())
        .collect();
    for expected in [
        "compose.yaml",
        "k8s/kustomization.yaml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/configmap.yaml",
        "k8s/secret.yaml",
        "k8s/pdb.yaml",
    ] {
        assert!(names.contains(expected), "deploy/{expected} is missing");
    }
    for file in &files {
        let docs = yaml_documents(file);
        assert!(
            docs.iter().any(|d| !d.is_null()),
            "{} is empty",
            file.display()
        );
        for doc in docs.iter().filter(|d| !d.is_null()) {
            assert!(
                doc.is_mapping(),
                "{}: a document is not a mapping",
                file.display()
            );
        }
    }
}

#[test]
fn k8s_objects_are_labelled_and_listed_in_the_kustomization() {
    let k8s = K8s::load();
    assert!(k8s.objects.len() >= 5);
    for (file, object) in &k8s.objects {
        let what = format!("{}", file.display());
        assert!(object["apiVersion"].is_string(), "{what}: apiVersion");
        assert!(object["kind"].is_string(), "{what}: kind");
        assert!(object["metadata"]["name"].is_string(), "{what}: name");
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/name"].as_str(),
            Some("switchboard"),
            "{what}: labelled app.kubernetes.io/name: switchboard"
        );
    }
    let dir = deploy().join("k8s");
    let kustomization = &yaml_documents(&dir.join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = strings(&kustomization["resources"], "resources")
        .into_iter()
        .collect();
    let files: BTreeSet<String> = k8s
        .objects
        .iter()
        .map(|(f, _)| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, files, "kustomization.yaml lists every manifest");
    // Its image override names the image the pods run.
    let image = str_of(&k8s.container()["image"], "image");
    let image_name = image.split(':').next().unwrap();
    let overrides = kustomization["images"].as_sequence().unwrap();
    assert!(
        overrides
            .iter()
            .any(|i| i["name"].as_str() == Some(image_name)),
        "kustomization.yaml `images` names {image_name}"
    );
}

#[test]
fn deployment_is_replicated_probed_and_locked_down() {
    let k8s = K8s::load();
    let deployment = k8s.deployment();
    let spec = &deployment["spec"];
    assert!(
        spec["replicas"].as_u64().unwrap() >= 2,
        "at least 2 replicas"
    );
    assert_eq!(spec["strategy"]["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0),
        "a rollout never goes below the replica count"
    );
    let pod_labels = labels(&spec["template"]["metadata"]["labels"]);
    assert!(
        selects(&labels(&spec["selector"]["matchLabels"]), &pod_labels),
        "the Deployment selects its own pods"
    );

    let container = k8s.container();
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    let probe = |name: &str, path: &str| {
        let get = &container[name]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{name} asks {path}");
        assert_eq!(
            k8s.container_port(&get["port"]),
            port,
            "{name} asks the HTTP port"
        );
    };
    probe("livenessProbe", "/healthz");
    probe("readinessProbe", "/readyz");
    if !container["startupProbe"].is_null() {
        probe("startupProbe", "/healthz");
    }

    // The router listens where the container port, the probes and the
    // Service say.
    let config = k8s.router_config();
    assert_eq!(
        u64::from(config.http.listen.port()),
        port,
        "the router listens on the container port"
    );
    assert!(
        config.http.listen.ip().is_unspecified(),
        "reachable from outside the pod"
    );

    let service = k8s.one("Service");
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["name"].as_str(), Some("http"));
    assert_eq!(k8s.container_port(&service_port["targetPort"]), port);
    assert!(
        selects(&labels(&service["spec"]["selector"]), &pod_labels),
        "the Service selects the Deployment's pods"
    );

    // Prometheus scrapes /metrics on the same port.
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(port.to_string().as_str())
    );

    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !container["resources"][kind][resource].is_null(),
                "resources.{kind}.{resource} is set"
            );
        }
    }

    let pod = k8s.pod();
    let non_root = |sc: &Value| sc["runAsNonRoot"].as_bool() == Some(true);
    assert!(
        non_root(&pod["securityContext"]) && non_root(&container["securityContext"]),
        "runAsNonRoot"
    );
    let uid = pod["securityContext"]["runAsUser"].as_u64().unwrap();
    assert_ne!(uid, 0);
    assert_eq!(
        uid.to_string(),
        Dockerfile::load().user_uid(),
        "the image's user"
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
}

#[test]
fn deployment_mounts_what_its_router_toml_names() {
    let k8s = K8s::load();
    let args = k8s.args();
    let config_path = Path::new(flag_value(&args, "--config").expect("args pass --config"));
    assert_eq!(
        k8s.env().get("SWITCHBOARD_CONFIG").map(String::as_str),
        config_path.to_str(),
        "`switchboard check` in the pod reads the same file"
    );
    // --config is router.toml in the ConfigMap's volume.
    let config_volume = k8s.volume_at(config_path.parent().unwrap());
    assert_eq!(config_path.file_name().unwrap(), "router.toml");
    assert_eq!(
        config_volume["configMap"]["name"].as_str(),
        k8s.one("ConfigMap")["metadata"]["name"].as_str()
    );

    let config = k8s.router_config();
    // state_dir: writable with a read-only root file system.
    assert!(config.state_dir.is_absolute());
    assert!(!k8s.volume_at(&config.state_dir)["emptyDir"].is_null());
    // plugins_dir: an emptyDir the init container fills from the image.
    assert!(config.plugins_dir.is_absolute());
    let plugins = k8s.volume_at(&config.plugins_dir);
    assert!(!plugins["emptyDir"].is_null());
    let plugins_volume = str_of(&plugins["name"], "volume name");
    let init = k8s.pod()["initContainers"]
        .as_sequence()
        .expect("an init container seeds the plugins")
        .iter()
        .find(|c| {
            c["volumeMounts"]
                .as_sequence()
                .is_some_and(|m| m.iter().any(|m| m["name"].as_str() == Some(plugins_volume)))
        })
        .expect("an init container writes the plugins volume");
    let command = strings(&init["command"], "init container command").join(" ");
    let dockerfile = Dockerfile::load();
    assert!(
        command.contains(&dockerfile.plugins_dir()),
        "the init container copies the image's plugins ({}): {command}",
        dockerfile.plugins_dir()
    );
}

#[test]
fn termination_grace_outlasts_the_drain() {
    let k8s = K8s::load();
    let args = k8s.args();
    let drain = duration(flag_value(&args, "--drain-timeout").expect("args pass --drain-timeout"));
    let pre_stop = &k8s.container()["lifecycle"]["preStop"];
    let pre_stop_pause = if pre_stop.is_null() {
        Duration::ZERO
    } else {
        let command = strings(&pre_stop["exec"]["command"], "preStop command");
        assert_eq!(command[0], "sleep", "preStop pauses");
        Duration::from_secs(command[1].parse().unwrap())
    };
    let grace = Duration::from_secs(
        k8s.pod()["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds is set"),
    );
    assert!(
        grace > pre_stop_pause + drain,
        "terminationGracePeriodSeconds ({grace:?}) must exceed the preStop pause \
         ({pre_stop_pause:?}) plus --drain-timeout ({drain:?})"
    );

    let compose = Compose::load();
    let command = compose.switchboard_command();
    let drain = duration(flag_value(&command, "--drain-timeout").unwrap_or("30s"));
    let grace = duration(str_of(
        &compose.service("switchboard")["stop_grace_period"],
        "stop_grace_period",
    ));
    assert!(
        grace > drain,
        "compose stop_grace_period ({grace:?}) must exceed --drain-timeout ({drain:?})"
    );
}

#[test]
fn pdb_keeps_a_router_up() {
    let k8s = K8s::load();
    let pdb = k8s.one("PodDisruptionBudget");
    let pod_labels = labels(&k8s.deployment()["spec"]["template"]["metadata"]["labels"]);
    assert!(
        selects(
            &labels(&pdb["spec"]["selector"]["matchLabels"]),
            &pod_labels
        ),
        "the PodDisruptionBudget selects the Deployment's pods"
    );
    let min_available = pdb["spec"]["minAvailable"].as_u64().unwrap();
    let replicas = k8s.deployment()["spec"]["replicas"].as_u64().unwrap();
    assert!(min_available >= 1);
    assert!(
        min_available < replicas,
        "a node drain can still evict one pod at a time"
    );
}

#[test]
fn secret_holds_every_key_the_pods_read_as_placeholders() {
    let k8s = K8s::load();
    let env = k8s.env(); // resolves every secretKeyRef against the Secret
    for name in ["RABBITMQ_URL", "REDIS_URL", "SWITCHBOARD_ADMIN_TOKEN"] {
        assert!(env.contains_key(name), "the pods get {name}");
    }
    let secret = k8s.one("Secret");
    let data = secret["stringData"].as_mapping().unwrap();
    for (key, value) in data {
        assert!(
            str_of(value, "secret value").contains("REPLACE"),
            "{key:?}: the shipped value is a placeholder marked REPLACE"
        );
    }
}

#[test]
fn a_forgotten_placeholder_token_stops_the_router_from_starting() {
    let k8s = K8s::load();
    let map = k8s.one("ConfigMap");
    let text = str_of(&map["data"]["router.toml"], "ConfigMap router.toml");
    let mut config: RouterConfig = toml::from_str(text).unwrap();
    let env = k8s.env();
    config.apply_env(|name| env.get(name).cloned());
    let errors = config.validate().unwrap_err();
    assert!(
        errors.iter().any(|e| e.starts_with("http.token:")),
        "the shipped placeholder must not be usable as a token: {errors:?}"
    );
}

#[test]
fn configmap_router_toml_validates_with_the_pods_environment() {
    let k8s = K8s::load();
    let config = k8s.router_config();
    assert_like_shipped_on_rabbitmq_and_redis(&config, "the ConfigMap's router.toml");
}

// --- docker compose -------------------------------------------------------------

struct Compose {
    file: Value,
}

impl Compose {
    fn load() -> Self {
        let mut docs = yaml_documents(&deploy().join("compose.yaml"));
        assert_eq!(docs.len(), 1);
        Self {
            file: docs.remove(0),
        }
    }

    fn service(&self, name: &str) -> &Value {
        let service = &self.file["services"][name];
        assert!(service.is_mapping(), "compose service {name}");
        service
    }

    fn switchboard_command(&self) -> Vec<String> {
        strings(&self.service("switchboard")["command"], "command")
    }

    /// The switchboard service's environment, `${VAR:-default}` as its default.
    fn switchboard_env(&self) -> BTreeMap<String, String> {
        let env = self.service("switchboard")["environment"]
            .as_mapping()
            .expect("environment as a mapping");
        env.iter()
            .map(|(k, v)| {
                let mut value = str_of(v, "environment value").to_string();
                if let Some(inner) = value.strip_prefix("${").and_then(|s| s.strip_suffix('}'))
                    && let Some((_, default)) = inner.split_once(":-")
                {
                    value = default.to_string();
                }
                (str_of(k, "environment name").to_string(), value)
            })
            .collect()
    }

    /// Container paths of the switchboard service's volumes.
    fn mounts(&self) -> BTreeMap<String, String> {
        strings(&self.service("switchboard")["volumes"], "volumes")
            .into_iter()
            .map(|v| {
                let mut parts = v.split(':');
                let source = parts.next().unwrap().to_string();
                let target = parts.next().expect("volume source:target").to_string();
                (target, source)
            })
            .collect()
    }

    fn router_config(&self) -> (PathBuf, RouterConfig) {
        let service = self.service("switchboard");
        let config = &service["configs"][0];
        let source = str_of(&config["source"], "configs source");
        let file = str_of(&self.file["configs"][source]["file"], "configs file");
        let path = deploy().join(file);
        let target = PathBuf::from(str_of(&config["target"], "configs target"));
        let config = router_config(
            &read(&path),
            &path.display().to_string(),
            &self.switchboard_env(),
        );
        (target, config)
    }
}

/// The URL's host, for `scheme://[user[:password]@]host[:port][/…]`.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    host_port.split(':').next().unwrap()
}

#[test]
fn compose_runs_the_router_on_healthy_rabbitmq_and_redis() {
    let compose = Compose::load();
    let rabbit = compose.service("rabbitmq");
    assert!(
        str_of(&rabbit["image"], "image").contains("management"),
        "RabbitMQ with the management UI"
    );
    let ports = strings(&rabbit["ports"], "rabbitmq ports").join(" ");
    assert!(ports.contains(":5672") && ports.contains(":15672"));
    let ping = strings(&rabbit["healthcheck"]["test"], "healthcheck").join(" ");
    assert!(ping.contains("rabbitmq-diagnostics") && ping.contains("ping"));

    let redis = compose.service("redis");
    assert!(str_of(&redis["image"], "image").starts_with("redis:7"));
    let command = strings(&redis["command"], "redis command").join(" ");
    assert!(
        command.contains("--appendonly yes"),
        "Redis persists plugin state"
    );
    assert!(!redis["healthcheck"].is_null());

    let switchboard = compose.service("switchboard");
    let build = &switchboard["build"];
    let context = deploy().join(str_of(&build["context"], "build context"));
    assert_eq!(
        context.canonicalize().unwrap(),
        repo().canonicalize().unwrap(),
        "the image is built from the repository"
    );
    let dockerfile = context.join(str_of(&build["dockerfile"], "build dockerfile"));
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        deploy().join("Dockerfile").canonicalize().unwrap()
    );
    for dependency in ["rabbitmq", "redis"] {
        assert_eq!(
            switchboard["depends_on"][dependency]["condition"].as_str(),
            Some("service_healthy"),
            "switchboard waits for a healthy {dependency}"
        );
        assert!(!compose.service(dependency)["healthcheck"].is_null());
    }
    let env = compose.switchboard_env();
    assert_eq!(url_host(&env["RABBITMQ_URL"]), "rabbitmq");
    assert_eq!(url_host(&env["REDIS_URL"]), "redis");
    assert!(env.contains_key("SWITCHBOARD_ADMIN_TOKEN"));

    let readyz = strings(&switchboard["healthcheck"]["test"], "healthcheck").join(" ");
    assert!(readyz.contains("/readyz"), "the healthcheck asks /readyz");
}

#[test]
fn compose_router_toml_validates_and_matches_the_mounts() {
    let compose = Compose::load();
    let (target, config) = compose.router_config();
    assert_like_shipped_on_rabbitmq_and_redis(&config, "deploy/compose/router.toml");

    let command = compose.switchboard_command();
    assert_eq!(
        flag_value(&command, "--config").map(Path::new),
        Some(target.as_path()),
        "the router reads the mounted router.toml"
    );
    let mounts = compose.mounts();
    for (what, dir) in [
        ("plugins_dir", &config.plugins_dir),
        ("state_dir", &config.state_dir),
    ] {
        assert!(dir.is_absolute(), "{what} is absolute");
        let source = mounts
            .get(dir.to_str().unwrap())
            .unwrap_or_else(|| panic!("{what} ({}) is a volume", dir.display()));
        assert!(
            compose.file["volumes"]
                .as_mapping()
                .unwrap()
                .contains_key(source.as_str()),
            "{source} is a named volume"
        );
    }
    // Filled from the image: the same folder the image keeps its plugins in.
    assert_eq!(
        config.plugins_dir,
        PathBuf::from(Dockerfile::load().plugins_dir())
    );

    let port = config.http.listen.port();
    let published = strings(&compose.service("switchboard")["ports"], "ports");
    assert!(
        published.iter().any(|p| p.ends_with(&format!(":{port}"))),
        "port {port} is published: {published:?}"
    );
}

// --- the Dockerfile ---------------------------------------------------------------

/// One instruction: keyword (upper case) and its arguments, continuation lines
/// joined, comments dropped.
struct Instruction {
    keyword: String,
    args: String,
}

struct Dockerfile {
    /// `ARG` defaults before the first `FROM`.
    args: BTreeMap<String, String>,
    /// Instructions per stage, after its `FROM`.
    stages: Vec<(String, Vec<Instruction>)>,
}

impl Dockerfile {
    fn load() -> Self {
        let text = read(&deploy().join("Dockerfile"));
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    current.push_str(part);
                    current.push(' ');
                }
                None => {
                    current.push_str(trimmed);
                    logical.push(std::mem::take(&mut current));
                }
            }
        }
        let mut args: BTreeMap<String, String> = BTreeMap::new();
        let mut stages: Vec<(String, Vec<Instruction>)> = Vec::new();
        for line in logical {
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            let rest = rest.trim().to_string();
            if keyword == "FROM" {
                let mut image = rest.split_whitespace().next().unwrap().to_string();
                for (name, value) in &args {
                    image = image.replace(&format!("${{{name}}}"), value);
                }
                stages.push((image, Vec::new()));
            } else if let Some((_, instructions)) = stages.last_mut() {
                instructions.push(Instruction {
                    keyword,
                    args: rest,
                });
            } else if keyword == "ARG" {
                let (name, value) = rest.split_once('=').unwrap_or((&rest, ""));
                args.insert(name.to_string(), value.to_string());
            }
        }
        Self { args, stages }
    }

    fn runtime(&self) -> &[Instruction] {
        &self.stages.last().unwrap().1
    }

    fn build(&self) -> &[Instruction] {
        assert!(self.stages.len() >= 2, "a multi-stage build");
        &self.stages[0].1
    }

    fn all<'a>(instructions: &'a [Instruction], keyword: &str) -> Vec<&'a str> {
        instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .map(|i| i.args.as_str())
            .collect()
    }

    /// The last `keyword` of the runtime stage, in exec (JSON) form.
    fn exec_form(&self, keyword: &str) -> Vec<String> {
        let args = Self::all(self.runtime(), keyword)
            .pop()
            .unwrap_or_else(|| panic!("no {keyword}"));
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("{keyword} is not in exec form ({e}): {args}"))
    }

    fn env(&self) -> BTreeMap<String, String> {
        Self::all(self.runtime(), "ENV")
            .iter()
            .flat_map(|args| args.split_whitespace())
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("ENV name=value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    /// Destinations of the runtime stage's `COPY` instructions.
    fn copied_to(&self) -> Vec<String> {
        Self::all(self.runtime(), "COPY")
            .iter()
            .map(|args| {
                args.split_whitespace()
                    .next_back()
                    .unwrap()
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect()
    }

    fn user_uid(&self) -> String {
        let user = Self::all(self.runtime(), "USER")
            .pop()
            .expect("the runtime stage sets USER");
        user.split(':').next().unwrap().to_string()
    }

    /// `--config` of the default command.
    fn config_path(&self) -> String {
        let cmd = self.exec_form("CMD");
        flag_value(&cmd, "--config")
            .expect("CMD passes --config")
            .to_string()
    }

    /// The image's router.toml: the shipped one, with `state_dir` replaced the
    /// way the build stage's `sed` does it.
    fn router_toml(&self) -> (String, String) {
        let marker = "s|^state_dir = .*|state_dir = \"";
        let run = Self::all(self.build(), "RUN")
            .into_iter()
            .find(|r| r.contains(marker))
            .expect("the build stage sets state_dir in router.toml");
        let state_dir = run.split_once(marker).unwrap().1.split('"').next().unwrap();
        let shipped = read(&repo().join("router.toml"));
        assert!(
            shipped.lines().any(|l| l.starts_with("state_dir = ")),
            "router.toml has the state_dir line the Dockerfile rewrites"
        );
        let text = shipped
            .lines()
            .map(|l| {
                if l.starts_with("state_dir = ") {
                    format!("state_dir = \"{state_dir}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        (text, state_dir.to_string())
    }

    /// Where the image keeps its plugins: router.toml's `plugins_dir`, relative
    /// to the folder of the CMD's router.toml.
    fn plugins_dir(&self) -> String {
        let (text, _) = self.router_toml();
        let config: RouterConfig = toml::from_str(&text).unwrap();
        Path::new(&self.config_path())
            .parent()
            .unwrap()
            .join(config.plugins_dir)
            .display()
            .to_string()
    }
}

#[test]
fn dockerfile_builds_what_the_makefile_builds() {
    let dockerfile = Dockerfile::load();
    let (build_image, _) = &dockerfile.stages[0];
    let tag = build_image
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("built from the official Rust image, not {build_image}"));
    assert!(tag.ends_with("-bookworm"), "Debian bookworm: {build_image}");
    let version = tag.trim_end_matches("-bookworm");
    let minor = |v: &str| -> u32 {
        let mut parts = v.split('.');
        assert_eq!(parts.next(), Some("1"), "Rust 1.x: {v}");
        parts.next().unwrap().parse().unwrap()
    };
    let workspace: toml::Value = toml::from_str(&read(&repo().join("Cargo.toml"))).unwrap();
    let rust_version = workspace["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    assert!(
        minor(version) >= minor(rust_version),
        "Rust {version} is older than the workspace's rust-version {rust_version}"
    );
    assert!(dockerfile.args.contains_key("RUST_VERSION"));

    let runs = Dockerfile::all(dockerfile.build(), "RUN").join("\n");
    for step in [
        "rustup target add wasm32-wasip2",
        "cargo build --release -p switchboard",
        "make plugins",
        "switchboard check --config",
    ] {
        assert!(runs.contains(step), "the build stage runs `{step}`");
    }
    // `make plugins` builds PLUGINS; each of them goes into the image.
    let makefile = read(&repo().join("Makefile"));
    assert!(
        makefile.contains("\nplugins: "),
        "the Makefile has `plugins`"
    );
    for plugin in makefile_plugins() {
        assert!(
            runs.contains(&format!("plugins/{plugin}.wasm")),
            "the image ships {plugin}.wasm"
        );
    }
}

#[test]
fn dockerfile_runs_the_router_as_the_other_files_expect() {
    let dockerfile = Dockerfile::load();
    let (runtime_image, _) = dockerfile.stages.last().unwrap();
    assert!(
        runtime_image.starts_with("debian:") && runtime_image.ends_with("-slim")
            || runtime_image.starts_with("gcr.io/distroless/cc"),
        "a small runtime image, not {runtime_image}"
    );

    let uid = dockerfile.user_uid();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER is a numeric non-root uid (runAsNonRoot can check it): {uid}"
    );
    let exposed = Dockerfile::all(dockerfile.runtime(), "EXPOSE").join(" ");
    assert_eq!(exposed, "8080");
    assert_eq!(
        dockerfile.exec_form("ENTRYPOINT"),
        vec!["switchboard".to_string()]
    );
    assert_eq!(dockerfile.exec_form("CMD")[0], "run");
    assert_eq!(
        Dockerfile::all(dockerfile.runtime(), "STOPSIGNAL"),
        vec!["SIGTERM"]
    );
    let copied = dockerfile.copied_to();
    assert!(copied.contains(&"/usr/local/bin/switchboard".to_string()));

    // CMD's --config is the router.toml the image copies in, and that file
    // validates with the image's environment.
    let config_path = dockerfile.config_path();
    assert!(
        copied.contains(&config_path),
        "CMD reads {config_path}, which the image copies in ({copied:?})"
    );
    let env = dockerfile.env();
    assert_eq!(
        env.get("SWITCHBOARD_CONFIG"),
        Some(&config_path),
        "tools in the container read the same file"
    );
    let (text, state_dir) = dockerfile.router_toml();
    let config = router_config(&text, "the image's router.toml", &env);
    assert_eq!(config.http.listen.to_string(), "0.0.0.0:8080");
    assert!(config.broker.url.is_none(), "the embedded bus by default");

    let volumes = dockerfile.exec_form("VOLUME");
    let plugins_dir = dockerfile.plugins_dir();
    assert!(
        copied.contains(&plugins_dir),
        "the plugins go to {plugins_dir}"
    );
    assert!(volumes.contains(&plugins_dir), "{plugins_dir} is a VOLUME");
    assert!(volumes.contains(&state_dir), "{state_dir} is a VOLUME");
    let runs = Dockerfile::all(dockerfile.runtime(), "RUN").join("\n");
    assert!(
        runs.contains(&format!("-o {uid} -g {uid}")) && runs.contains(&state_dir),
        "{state_dir} is writable by the image's user"
    );
}

#[test]
fn dockerignore_keeps_build_outputs_out_of_the_context() {
    let text = read(&repo().join(".dockerignore"));
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for excluded in ["target", ".git", "*.wasm", ".switchboard", "node_modules"] {
        assert!(
            patterns
                .iter()
                .any(|p| p.trim_matches('/').trim_start_matches("**/") == excluded),
            ".dockerignore excludes {excluded}"
        );
    }
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "Makefile",
        "router.toml",
        "host",
        "plugins",
    ] {
        assert!(
            !patterns.iter().any(|p| p.trim_matches('/') == needed),
            "the build needs {needed}"
        );
    }
}

#[test]
fn readmes_show_the_commands_the_files_support() {
    let readme = read(&deploy().join("README.md"));
    for command in [
        "docker build -f deploy/Dockerfile -t switchboard .",
        "docker compose -f deploy/compose.yaml up",
        "kubectl apply -k deploy/k8s",
    ] {
        assert!(
            readme.contains(command),
            "deploy/README.md shows `{command}`"
        );
    }
    assert!(
        read(&repo().join("README.md")).contains("deploy/README.md"),
        "the README points to deploy/README.md"
    );
}
