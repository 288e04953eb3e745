//! `switchboard new`: for each language, the scaffold builds with its own Makefile
//! and its golden test passes, as generated; the README's "A plugin in five
//! minutes" works as written, up to an event in a running appliance; a scaffold
//! whose `switchboard` command is missing says how to get it. The Python and
//! JavaScript builds use the toolchains `make lang-plugins` installed into
//! target/toolchains (the same pinned versions the scaffolds name), and the Rust
//! builds the workspace's target folder, so that nothing is fetched or built twice.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard_tests::process::Replica;
use switchboard_tests::{target_dir, wait_until};

fn switchboard() -> std::path::PathBuf {
    let bin = target_dir().join("release/switchboard");
    assert!(
        bin.exists(),
        "{} is missing: `make test` builds it",
        bin.display()
    );
    bin
}

/// A path under target/toolchains, which `make lang-plugins` fills.
fn installed(path: &str) -> std::path::PathBuf {
    let path = target_dir().join("toolchains").join(path);
    assert!(
        path.exists(),
        "{} is missing: `make lang-plugins` installs it",
        path.display()
    );
    path
}

/// `switchboard new <name> --lang <lang>` into `<parent>/<name>`; the folder.
fn scaffold(name: &str, lang: &str, parent: &Path) -> PathBuf {
    let plugin = parent.join(name);
    let out = Command::new(switchboard())
        .args(["new", name, "--lang", lang, "--dir"])
        .arg(&plugin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "switchboard new: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(plugin.join("wit/switchboard.wit").exists());
    plugin
}

/// Stdout and stderr of a finished command, for assertions and failures.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `switchboard new` then `make test` in the scaffold; returns make's output.
fn scaffold_and_test(
    name: &str,
    lang: &str,
    configure: impl FnOnce(&Path, &mut Command),
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let plugin = scaffold(name, lang, dir.path());

    let mut make = Command::new("make");
    make.arg("-C")
        .arg(&plugin)
        .arg(format!("SWITCHBOARD={}", switchboard().display()));
    configure(&plugin, &mut make);
    make.arg("test");
    let out = make.output().unwrap();
    let text = text(&out);
    assert!(
        out.status.success(),
        "make test in the {lang} scaffold failed:\n{text}"
    );
    assert!(plugin.join(format!("{name}.wasm")).exists(), "{text}");
    assert!(text.contains("all 3 lines match"), "{text}");
    text
}

/// The `sh` blocks of the README's section `heading` (`## …`), in order.
fn readme_sh_blocks(heading: &str) -> Vec<String> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(readme).unwrap();
    let mut lines = readme.lines().skip_while(|l| *l != heading).skip(1);
    let (mut blocks, mut block): (Vec<String>, Option<String>) = (vec![], None);
    for line in lines.by_ref() {
        match (&mut block, line) {
            (None, "```sh") => block = Some(String::new()),
            (None, l) if l.starts_with('#') => break,
            (Some(_), "```") => blocks.extend(block.take()),
            (Some(text), l) => {
                text.push_str(l);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(
        !blocks.is_empty(),
        "README.md has no sh block under {heading}"
    );
    blocks
}

/// Runs `script` with `sh -e` in `dir`, with `switchboard` on the PATH (where
/// `make install` would put it) and Rust builds in the workspace's target
/// folder (its dependencies are built there already).
fn sh(dir: &Path, script: &str) -> Output {
    let bin = switchboard();
    let path = std::env::join_paths(
        std::iter::once(bin.parent().unwrap().to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    Command::new("sh")
        .args(["-e", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("SWITCHBOARD")
        .output()
        .unwrap()
}

/// README.md, "A plugin in five minutes", followed as written in a folder laid
/// out as the checkout where `make run` runs: the shipped router.toml and
/// plugins, served by `switchboard run`. `make install` stands for putting
/// target/release on the PATH; `localhost:8080` is the appliance's port.
#[test]
fn the_readmes_five_minute_plugin_in_rust_builds_passes_its_test_and_runs_when_dropped_in() {
    let started = Instant::now();
    let blocks = readme_sh_blocks("## A plugin in five minutes");
    let [build, deploy_and_publish, ..] = &blocks[..] else {
        panic!("expected two sh blocks: {blocks:?}")
    };
    assert!(
        build.contains("switchboard new greeter --lang rust"),
        "{build}"
    );
    let build: String = build
        .lines()
        .filter(|l| !l.starts_with("make install"))
        .map(|l| format!("{l}\n"))
        .collect();
    let curl = deploy_and_publish
        .find("curl ")
        .unwrap_or_else(|| panic!("no curl in {deploy_and_publish}"));
    let (deploy, publish) = deploy_and_publish.split_at(curl);

    // `make run` in the checkout.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let router_toml = std::fs::read_to_string(root.join("router.toml")).unwrap();
    let seed = [
        ("billing.wasm", "billing"),
        ("notification.wasm", "notification"),
        ("analytics.wasm", "analytics"),
        ("orders.wasm", "orders"),
    ];
    let replica = Replica::start(&router_toml, &seed);

    // Scaffold, build, test, then copy into plugins/ and declare in router.toml.
    let out = sh(replica.dir(), &format!("{build}{deploy}"));
    let made = text(&out);
    assert!(
        out.status.success(),
        "the README's commands failed:\n{made}"
    );
    assert!(made.contains("all 3 lines match"), "{made}");
    assert!(
        replica.dir().join("plugins/greeter.wasm").exists(),
        "{made}"
    );
    let built = started.elapsed();

    // The running appliance picks both up, without a restart.
    wait_until(
        "greeter to serve with its route",
        Duration::from_secs(60),
        || {
            replica.plugin("greeter")["status"] == "serving"
                && replica
                    .get("/api/routes")
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["plugin"] == "greeter" && r["pattern"] == "greeting.requested")
        },
    );

    // Event in…
    let address = replica.url.trim_start_matches("http://");
    let publish = publish.replace("localhost:8080", address);
    let out = sh(&replica.dir().join("greeter"), &publish);
    assert!(out.status.success(), "{publish}: {}", text(&out));
    let reply: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let id = reply["id"].as_str().unwrap_or_else(|| panic!("{reply}"));

    // …output out: greeter's answer, published back to the exchange.
    let mut sent = Value::Null;
    wait_until(
        "greeting.sent in the event history",
        Duration::from_secs(20),
        || {
            sent = replica.get("/api/events?match=greeting.sent")["items"][0].clone();
            !sent.is_null()
        },
    );
    assert_eq!(sent["causation_id"], id, "{sent}");
    assert_eq!(sent["body"]["source"], "greeter", "{sent}");
    assert_eq!(
        sent["body"]["data"],
        serde_json::json!({"greeting": "Hello, Ada!"}),
        "{sent}"
    );
    eprintln!(
        "five-minute path: scaffold, build and test {built:.1?}, all {:.1?}",
        started.elapsed()
    );
}

/// Without the `switchboard` command, each scaffold's `make test` stops before
/// building anything and says, in one line, how to get it.
#[test]
fn a_scaffolds_make_test_without_the_switchboard_command_says_how_to_get_it() {
    // The PATH without any folder that has a `switchboard`.
    let path = std::env::join_paths(
        std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .filter(|dir| !dir.join("switchboard").exists()),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for lang in ["rust", "python", "js"] {
        let plugin = scaffold(&format!("greeter-{lang}"), lang, dir.path());
        for (missing, setting) in [
            (
                "/nonexistent/switchboard",
                Some("SWITCHBOARD=/nonexistent/switchboard"),
            ),
            ("switchboard", None),
        ] {
            let mut make = Command::new("make");
            make.arg("-C").arg(&plugin).env("PATH", &path);
            make.env_remove("SWITCHBOARD").args(setting).arg("test");
            let out = make.output().unwrap();
            let said = text(&out);
            assert!(!out.status.success(), "{lang}, {missing}: {said}");
            let line = format!(
                "make test needs the switchboard command and \"{missing}\" is not found: \
                 run `make install` in your Switchboard checkout, or give its path: \
                 SWITCHBOARD=/path/to/switchboard make test\n"
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).starts_with(&line),
                "{lang}, {missing}: {said}"
            );
            for built in [format!("greeter-{lang}.wasm"), "node_modules".into()] {
                assert!(!plugin.join(&built).exists(), "{lang}: {built} was built");
            }
        }
    }
}

#[test]
fn the_python_scaffold_builds_and_passes_its_test() {
    let componentize_py = installed("python/bin/componentize-py");
    scaffold_and_test("greeter-py", "python", |_, make| {
        make.arg(format!("COMPONENTIZE_PY={}", componentize_py.display()));
    });
}

#[test]
fn the_javascript_scaffold_builds_and_passes_its_test() {
    let modules = installed("js/node_modules");
    scaffold_and_test("greeter-js", "js", |plugin, make| {
        std::os::unix::fs::symlink(&modules, plugin.join("node_modules")).unwrap();
        // Installed already: don't let make run `npm install` over it.
        make.args(["-o", "node_modules"]);
    });
}
