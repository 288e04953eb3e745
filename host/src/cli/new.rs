//! `switchboard new`: scaffold a plugin in Rust, Python or JavaScript.
//!
//! The scaffold is a folder that builds on its own: the contract (`wit/`), a
//! handler that compiles, a Makefile whose `make` builds `<name>.wasm` and whose
//! `make test` runs it through `switchboard test` over a sample event file against
//! a golden file that passes as generated. Toolchain versions are the ones this
//! release is tested with (`toolchains/` in its source).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The plugin contract, as this host implements it.
const WIT: &str = include_str!("../../../plugin-sdk/wit/switchboard.wit");

const EVENTS: &str = include_str!("new/common/events.jsonl");
const EXPECTED: &str = include_str!("new/common/expected.jsonl");
const README: &str = include_str!("new/common/README.md");

/// A language a plugin can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    /// The language's name, for people.
    pub fn title(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }
}

/// What to scaffold (the `switchboard new` arguments).
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The plugin's name, as router.toml will call it: lowercase letters, digits,
    /// `-` and `_`, starting with a letter.
    pub name: String,
    /// The language of the handler.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    pub lang: Lang,
    /// Where to create it (default: a folder named after the plugin). It must not
    /// exist, or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The files of a scaffold, as (relative path, content).
pub fn files(name: &str, lang: Lang) -> anyhow::Result<Vec<(&'static str, String)>> {
    check_name(name)?;
    let crate_name = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
    };
    let (source, setup) = match lang {
        Lang::Rust => ("src/lib.rs", "rustup target add wasm32-wasip2\n"),
        Lang::Python => (
            "app.py",
            "python3 -m venv .venv && .venv/bin/pip install --require-hashes -r requirements.txt\n\
             export PATH=\"$PWD/.venv/bin:$PATH\"\n",
        ),
        Lang::Js => ("app.js", ""),
    };
    let readme = fill(README)
        .replace("{{language}}", lang.title())
        .replace("{{source}}", source)
        .replace("{{setup}}", setup);

    let mut files = vec![
        ("wit/switchboard.wit", WIT.to_owned()),
        ("events.jsonl", EVENTS.to_owned()),
        ("expected.jsonl", fill(EXPECTED)),
        ("README.md", readme),
    ];
    match lang {
        Lang::Rust => files.extend([
            ("Cargo.toml", fill(include_str!("new/rust/Cargo.toml"))),
            ("src/lib.rs", fill(include_str!("new/rust/lib.rs"))),
            ("Makefile", fill(include_str!("new/rust/Makefile"))),
            (".gitignore", include_str!("new/rust/gitignore").to_owned()),
        ]),
        Lang::Python => files.extend([
            ("app.py", fill(include_str!("new/python/app.py"))),
            (
                "requirements.txt",
                include_str!("../../../toolchains/python/requirements.txt").to_owned(),
            ),
            ("Makefile", fill(include_str!("new/python/Makefile"))),
            (
                ".gitignore",
                include_str!("new/python/gitignore").to_owned(),
            ),
        ]),
        Lang::Js => files.extend([
            ("app.js", fill(include_str!("new/js/app.js"))),
            (
                "package.json",
                js_package(include_str!("../../../toolchains/js/package.json"), name)?,
            ),
            (
                "package-lock.json",
                js_package(
                    include_str!("../../../toolchains/js/package-lock.json"),
                    name,
                )?,
            ),
            (
                "componentize.mjs",
                include_str!("../../../toolchains/js/componentize.mjs").to_owned(),
            ),
            ("Makefile", fill(include_str!("new/js/Makefile"))),
            (".gitignore", include_str!("new/js/gitignore").to_owned()),
        ]),
    }
    Ok(files)
}

/// The toolchain's package.json or lock file, renamed to the plugin.
fn js_package(text: &str, name: &str) -> anyhow::Result<String> {
    let mut value: serde_json::Value = serde_json::from_str(text)?;
    value["name"] = name.into();
    value.as_object_mut().map(|o| o.remove("description"));
    if let Some(root) = value.pointer_mut("/packages/") {
        root["name"] = name.into();
    }
    Ok(serde_json::to_string_pretty(&value)? + "\n")
}

/// A name that is a valid plugin name and a valid Rust package name.
fn check_name(name: &str) -> anyhow::Result<()> {
    crate::config::check_plugin_name(name).map_err(anyhow::Error::msg)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        bail!("plugin name {name:?} must start with a letter");
    }
    Ok(())
}

/// Writes the scaffold; prints what was made and what to do next.
pub fn run(args: &NewArgs, out: &mut dyn std::io::Write) -> anyhow::Result<i32> {
    let files = files(&args.name, args.lang)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    create_empty(&dir)?;
    for (path, content) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, content)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    writeln!(
        out,
        "created {} ({} plugin, {} files)\nnext: cd {} && make && make test",
        dir.display(),
        args.lang.title(),
        files.len(),
        dir.display()
    )?;
    Ok(0)
}

/// Creates `dir`, or accepts it if it exists and is empty.
fn create_empty(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} exists and is not empty", dir.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot use {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_gets_the_contract_events_golden_and_a_makefile() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            let files = files("hello-world", lang).unwrap();
            let names: Vec<_> = files.iter().map(|(p, _)| *p).collect();
            for expected in [
                "wit/switchboard.wit",
                "events.jsonl",
                "expected.jsonl",
                "Makefile",
            ] {
                assert!(names.contains(&expected), "{lang:?}: {names:?}");
            }
            for (path, content) in &files {
                assert!(!content.contains("{{name}}"), "{lang:?} {path}");
                assert!(!content.contains("{{crate}}"), "{lang:?} {path}");
            }
            let makefile = &files.iter().find(|(p, _)| *p == "Makefile").unwrap().1;
            assert!(makefile.contains("hello-world.wasm"), "{makefile}");
            // The command comes from the PATH or SWITCHBOARD, and is checked first.
            assert!(
                makefile.contains("SWITCHBOARD ?= switchboard\n"),
                "{makefile}"
            );
            assert!(
                makefile.contains("test: switchboard-command hello-world.wasm\n"),
                "{makefile}"
            );
            assert!(makefile.contains("`make install`"), "{makefile}");
        }
        let rust = files("hello-world", Lang::Rust).unwrap();
        let makefile = &rust.iter().find(|(p, _)| *p == "Makefile").unwrap().1;
        assert!(makefile.contains("release/hello_world.wasm"), "{makefile}");
    }

    #[test]
    fn the_js_scaffold_pins_the_tested_toolchain_under_its_own_name() {
        let files = files("greeter", Lang::Js).unwrap();
        let package: serde_json::Value =
            serde_json::from_str(&files.iter().find(|(p, _)| *p == "package.json").unwrap().1)
                .unwrap();
        assert_eq!(package["name"], "greeter");
        let toolchain: serde_json::Value =
            serde_json::from_str(include_str!("../../../toolchains/js/package.json")).unwrap();
        assert_eq!(package["dependencies"], toolchain["dependencies"]);
        let lock: serde_json::Value = serde_json::from_str(
            &files
                .iter()
                .find(|(p, _)| *p == "package-lock.json")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(lock["packages"][""]["name"], "greeter");
    }

    #[test]
    fn names_must_suit_router_toml_and_cargo() {
        for bad in ["", "Hello", "9lives", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(files(bad, Lang::Rust).is_err(), "{bad:?}");
        }
        assert!(files("a", Lang::Python).is_ok());
        assert!(files("shop_events-2", Lang::Js).is_ok());
    }

    #[test]
    fn it_writes_into_a_new_or_empty_folder_only() {
        let dir = tempfile::tempdir().unwrap();
        let args = |d: &Path| NewArgs {
            name: "greeter".into(),
            lang: Lang::Python,
            dir: Some(d.to_path_buf()),
        };
        let target = dir.path().join("greeter");
        let mut out = Vec::new();
        assert_eq!(run(&args(&target), &mut out).unwrap(), 0);
        assert!(target.join("wit/switchboard.wit").exists());
        assert!(target.join("app.py").exists());
        let err = run(&args(&target), &mut out).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(run(&args(&empty), &mut out).unwrap(), 0);
    }
}
