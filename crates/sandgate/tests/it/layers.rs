//! The module layers (docs/architecture.md): listener → lanes → gateway → policy → proxy /
//! api → manager → backend / store → model. Every `crate::` path in a module must name a
//! module on a lower layer (or its own), so no two modules import each other in a circle.

/// Each top-level module and its layer; a module may import only from lower layers.
const LAYERS: &[(&str, u8)] = &[
    ("model", 0),
    ("event_loop", 0),
    ("breaker", 0),
    ("config", 1),
    ("datadir", 1),
    ("store", 1),
    ("routes", 1),
    ("warm", 1),
    ("metrics", 1),
    ("runtimes", 2),
    ("error", 2),
    ("access", 2),
    ("tls", 2),
    ("balance", 2),
    ("backend", 3),
    ("files", 3),
    ("routing", 3),
    ("admission", 3),
    ("addresses", 3),
    ("rates", 3),
    ("auth", 3),
    ("audit", 3),
    ("manager", 4),
    ("exec", 4),
    ("exec_files", 4),
    ("proxy", 4),
    ("lifecycle", 5),
    ("api", 5),
    ("policy", 6),
    ("gateway", 7),
    ("hyperlane", 8),
    ("fastlane", 9),
    ("server", 10),
    ("workers", 11),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module {module} has no layer in tests/it/layers.rs"))
}

#[test]
fn modules_import_only_from_lower_layers() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs");
        if matches!(module, "lib" | "main" | "bin") {
            continue;
        }
        let own = layer(module);
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let used: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used.is_empty() {
                    wrong.push(format!(
                        "{}: write `crate::module::…`, not `crate::{{…}}`",
                        rel.display()
                    ));
                } else if used != module && layer(&used) >= own {
                    wrong.push(format!("{}: {module} → {used}", rel.display()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up or sideways: {wrong:#?}"
    );
}
