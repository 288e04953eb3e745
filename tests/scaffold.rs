//! `switchboard new`: for each language, the scaffold builds with its own Makefile
//! and its golden test passes, as generated. The Python and JavaScript builds use
//! the toolchains `make lang-plugins` installed into target/toolchains (the same
//! pinned versions the scaffolds name), so that nothing is fetched twice.

use std::path::Path;
use std::process::Command;

use switchboard_tests::target_dir;

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

/// Runs `switchboard new` then `make test` in the scaffold; returns make's output.
fn scaffold_and_test(
    name: &str,
    lang: &str,
    configure: impl FnOnce(&Path, &mut Command),
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join(name);
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

    let mut make = Command::new("make");
    make.arg("-C")
        .arg(&plugin)
        .arg(format!("SWITCHBOARD={}", switchboard().display()));
    configure(&plugin, &mut make);
    make.arg("test");
    let out = make.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "make test in the {lang} scaffold failed:\n{text}"
    );
    assert!(plugin.join(format!("{name}.wasm")).exists(), "{text}");
    assert!(text.contains("all 3 lines match"), "{text}");
    text
}

#[test]
fn the_rust_scaffold_builds_and_passes_its_test() {
    scaffold_and_test("greeter-rs", "rust", |_, make| {
        // The workspace's target folder: its dependencies are built there already.
        make.env("CARGO_TARGET_DIR", target_dir());
    });
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
