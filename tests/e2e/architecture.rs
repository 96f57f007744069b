//! Enforces the architecture invariants listed in ARCHITECTURE.md.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use cargo_metadata::{Metadata, MetadataCommand, PackageId};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

fn metadata() -> Metadata {
    MetadataCommand::new().current_dir(workspace_root()).exec().expect("cargo metadata")
}

/// Names of every package `package` depends on at build or run time (normal and build
/// dependencies, transitively; dev-dependencies are not part of what ships).
fn shipped_dependencies(metadata: &Metadata, package: &str) -> BTreeSet<String> {
    let resolve = metadata.resolve.as_ref().expect("resolved graph");
    let nodes: HashMap<&PackageId, _> = resolve.nodes.iter().map(|n| (&n.id, n)).collect();
    let names: HashMap<&PackageId, &str> =
        metadata.packages.iter().map(|p| (&p.id, p.name.as_str())).collect();
    let root = metadata.packages.iter().find(|p| p.name.as_str() == package).expect("package exists");
    let mut seen = BTreeSet::new();
    let mut stack = vec![&root.id];
    while let Some(id) = stack.pop() {
        for dep in &nodes[id].deps {
            let shipped = dep.dep_kinds.iter().any(|k| k.kind != cargo_metadata::DependencyKind::Development);
            if shipped && seen.insert(names[&dep.pkg].to_owned()) {
                stack.push(&dep.pkg);
            }
        }
    }
    seen
}

fn forbidden_in(deps: &BTreeSet<String>, forbidden: &[&str]) -> Vec<String> {
    forbidden.iter().filter(|f| deps.contains(**f)).map(|f| f.to_string()).collect()
}

#[test]
fn privacy_depends_on_no_runtime_rpc_or_tensor_library() {
    let deps = shipped_dependencies(&metadata(), "guild-privacy");
    let found = forbidden_in(&deps, &["tokio", "tonic", "tch", "torch-sys", "hyper", "mio"]);
    assert!(found.is_empty(), "guild-privacy must do no I/O, but depends on {found:?}");
}

#[test]
fn coordinator_does_not_link_libtorch() {
    let deps = shipped_dependencies(&metadata(), "guild-coordinator");
    let found = forbidden_in(&deps, &["tch", "torch-sys"]);
    assert!(found.is_empty(), "guild-coordinator must not link libtorch, but depends on {found:?}");
}

#[test]
fn only_binaries_use_clap() {
    let metadata = metadata();
    for package in metadata.workspace_packages() {
        let has_binary = package.targets.iter().any(|t| t.is_bin());
        let deps = shipped_dependencies(&metadata, package.name.as_str());
        if !has_binary {
            assert!(!deps.contains("clap"), "{} has no binary but depends on clap", package.name);
        }
        // In a package with a binary, clap may appear only in the binary's main.rs. (This
        // package, which names clap in its checks, has no binary and is skipped.)
        if package.name.as_str() == "guild-tests" {
            continue;
        }
        let src = package.manifest_path.parent().expect("manifest dir").as_std_path().to_owned();
        for file in rust_files(&src) {
            if file.file_name().is_some_and(|n| n == "main.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("read source");
            assert!(!text.contains("clap::"), "{} uses clap outside a binary's main.rs", file.display());
        }
    }
}

#[test]
fn only_guild_proto_knows_protobuf() {
    let metadata = metadata();
    for package in metadata.workspace_packages() {
        let direct: Vec<_> = package.dependencies.iter().map(|d| d.name.as_str()).collect();
        let name = package.name.as_str();
        if name != "guild-proto" {
            assert!(
                !direct.iter().any(|d| d.starts_with("prost")),
                "{name} depends on prost directly; wire types belong to guild-proto"
            );
        }
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let missing: Vec<_> = rust_files(&workspace_root())
        .into_iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("read source");
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(missing.is_empty(), "files without a leading //! doc: {missing:?}");
}
