//! The architecture as a test: every `crate::` (and `super::` reaching the crate root) path in
//! `src/` names a module listed above the importing one in the layer map of `src/lib.rs`, so the
//! modules form no cycle and the map stays true. A new module must be added to the map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules in the order of the map in lib.rs's crate doc, lowest first.
fn layers(lib: &str) -> Vec<String> {
    let block = lib
        .split("```text")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("lib.rs's doc holds the layer map in a ```text block");
    block
        .lines()
        .filter_map(|l| l.trim_start_matches("//!").split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under `src/`: `src/store/read.rs` → [store, read].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> =
        rel.iter().map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
        parts.pop();
    }
    parts
}

/// Top-level modules a source names: `crate::x`, and `super::…` paths that climb to the root.
/// Comments and string literals are skipped; nothing else is needed for the rule.
fn imports(text: &str, module: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        if code.trim_start().starts_with('"') {
            continue;
        }
        for (i, _) in code.match_indices("crate::") {
            let before = code[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `$crate::`
            }
            let name: String =
                code[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.insert(name);
        }
        for (i, _) in code.match_indices("super::") {
            if i > 0 && code[..i].ends_with("super::") {
                continue; // counted from the first `super::` of a chain
            }
            let mut rest = &code[i..];
            let mut up = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                up += 1;
                rest = r;
            }
            // A file's own module is `module`; `super` is its parent.
            if up >= module.len() {
                let name: String =
                    rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn imports_follow_the_layers_of_lib_rs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = layers(&lib);
    let rank: BTreeMap<&str, usize> =
        order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut declared = BTreeSet::new();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = module_of(rel);
        let Some(top) = module.first() else { continue }; // lib.rs, main.rs
        declared.insert(top.clone());
        let text = std::fs::read_to_string(file).unwrap();
        let Some(&own) = rank.get(top.as_str()) else {
            wrong.push(format!("{}: module {top} is not in lib.rs's layer map", rel.display()));
            continue;
        };
        for name in imports(&text, &module) {
            match rank.get(name.as_str()) {
                Some(&r) if r < own || name == *top => {}
                Some(_) => wrong.push(format!(
                    "{}: {top} imports {name}, which the map puts above it",
                    rel.display()
                )),
                // `crate::` followed by a macro or a re-export at the root.
                None => {}
            }
        }
    }
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    for m in listed.difference(&declared) {
        wrong.push(format!("lib.rs's layer map lists {m}, which src/ does not hold"));
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers of src/lib.rs:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    let module = vec!["store".to_string(), "read".to_string()];
    let found = imports("use crate::archive::Ranges;\nuse super::super::api::x;", &module);
    assert!(found.contains("archive") && found.contains("api"), "{found:?}");
    let found = imports("// crate::cli in a comment\nuse super::Store;", &module);
    assert!(found.is_empty(), "{found:?}");
    let order = layers("//! ```text\n//! event  a\n//! store  b\n//! ```\n");
    assert_eq!(order, ["event", "store"]);
}
