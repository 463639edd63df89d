//! The import graph of `agent/src`, derived from the source, against the one drawn in
//! docs/architecture.md ("Imports"). The test fails when a change adds or drops an import
//! between modules without the drawing following, when the drawing's order is not an order
//! in which every module comes after what it imports, or when two modules (folders taken as
//! one) import each other through any path.
//!
//! What counts as an import: every `crate::` path and every `super::` path in a module's
//! files, outside comments, string literals and `#[cfg(test)]` items. A folder's private
//! parts (`tables/ledger.rs`, ...) are the folder's module; `fabric::{liqo, doctor, enforce}`
//! and `rear::{consumer, provider}` are modules of their own. Items the crate root re-exports
//! count for the module that defines them (`crate::Config` is `config`); the root's own
//! items (`AgentError`, `Step`, `Observer`) are `root`, and the root's row lists what those
//! items use (its `pub mod` and `pub use` lines are the crate's facade, not imports).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules with a row of their own in the drawing, by the file(s) that hold them.
fn module_of(rel: &Path) -> Option<String> {
    let s = rel.to_str()?.trim_end_matches(".rs");
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        ["bin", ..] => None,
        ["lib"] => Some("(crate root)".into()),
        ["tables", ..] => Some("tables".into()),
        ["rear", "mod"] => Some("rear".into()),
        [top, "mod"] => Some((*top).into()),
        ["fabric", sub] | ["rear", sub] => Some(format!("{}::{sub}", parts[0])),
        [top] => Some((*top).into()),
        _ => None,
    }
}

const SUBMODULES: &[(&str, &[&str])] = &[
    ("fabric", &["liqo", "doctor", "enforce"]),
    ("rear", &["consumer", "provider"]),
];

/// What the crate root re-exports, by the module that defines it (agent/src/lib.rs).
const REEXPORTS: &[(&str, &str)] = &[
    ("Config", "config"),
    ("unix_ms", "model"),
    ("version", "model"),
    ("GIT_REV", "model"),
    ("RELEASE", "model"),
    ("Agent", "node"),
];

/// The source with comments and literals blanked, so that paths in docs and strings do not
/// count.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&b, i) {
            // A raw string: r"...", r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                let mut j = i + 2;
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// The code without `#[cfg(test)]` items (a test module, a test-only function).
fn without_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let mut depth = 0usize;
        let mut end = item.len();
        for (k, ch) in item.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = k + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Every path that follows `prefix` (`crate::` or `super::`), groups expanded: the first
/// two segments of each.
fn paths_after(code: &str, prefix: &str) -> Vec<(String, Option<String>)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(prefix) {
        let start = from + at;
        from = start + prefix.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let tail = &code[from..];
        if tail.starts_with('{') {
            let mut depth = 0usize;
            let mut end = tail.len();
            for (k, ch) in tail.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = k;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            for item in split_top(&tail[1..end]) {
                found.push(two_segments(item.trim()));
            }
        } else {
            found.push(two_segments(tail));
        }
    }
    found
}

fn split_top(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (k, ch) in group.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..k]);
                start = k + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

fn two_segments(path: &str) -> (String, Option<String>) {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let first = ident(path);
    let after = &path[first.len()..];
    let second = after
        .strip_prefix("::")
        .map(ident)
        .filter(|s| !s.is_empty());
    (first, second)
}

fn resolve(first: &str, second: Option<&str>, modules: &BTreeSet<String>) -> String {
    for (parent, subs) in SUBMODULES {
        if first == *parent {
            if let Some(s) = second.filter(|s| subs.contains(s)) {
                return format!("{parent}::{s}");
            }
        }
    }
    if modules.contains(first) {
        return first.to_string();
    }
    REEXPORTS
        .iter()
        .find(|(item, _)| *item == first)
        .map(|(_, m)| m.to_string())
        .unwrap_or_else(|| "root".to_string())
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read agent/src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// module -> the modules it imports, from the source.
fn derived() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let owned: Vec<(PathBuf, String)> = files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).ok()?.to_path_buf();
            // tables/tests.rs is the tables' unit-test module.
            if rel == Path::new("tables/tests.rs") {
                return None;
            }
            module_of(&rel).map(|m| (p, m))
        })
        .collect();
    let mut modules: BTreeSet<String> = owned.iter().map(|(_, m)| m.clone()).collect();
    modules.remove("(crate root)");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, module) in &owned {
        let text = std::fs::read_to_string(path).expect("read source");
        let mut code = without_tests(&code_only(&text));
        if module == "(crate root)" {
            // The root's facade (`pub mod`, `pub use node::Agent`) is not what its own items
            // use.
            code = code
                .lines()
                .filter(|l| !l.starts_with("pub use ") && !l.starts_with("pub mod "))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let deps = graph.entry(module.clone()).or_default();
        for (first, second) in paths_after(&code, "crate::") {
            deps.insert(resolve(&first, second.as_deref(), &modules));
        }
        // `super::` from a file of a folder is the folder's module (or a sibling of it).
        let rel = path.strip_prefix(&src).expect("under src");
        if let Some(folder) = rel
            .parent()
            .and_then(|p| p.to_str())
            .filter(|p| !p.is_empty())
        {
            for (first, _) in paths_after(&code, "super::") {
                let sibling = format!("{folder}::{first}");
                if modules.contains(&sibling) {
                    deps.insert(sibling);
                } else {
                    deps.insert(folder.to_string());
                }
            }
        }
        // Bare paths: the crate root names its modules (`tables::TableError`), a module its
        // own children (`liqo::` in fabric.rs).
        let children: Vec<String> = if module == "(crate root)" {
            modules
                .iter()
                .filter(|m| !m.contains("::"))
                .cloned()
                .collect()
        } else {
            SUBMODULES
                .iter()
                .filter(|(parent, _)| parent == module)
                .flat_map(|(parent, subs)| subs.iter().map(move |s| (parent, s)))
                .map(|(_, s)| s.to_string())
                .collect()
        };
        for child in &children {
            if !paths_after(&code, &format!("{child}::")).is_empty() {
                if module == "(crate root)" {
                    deps.insert(child.clone());
                } else {
                    deps.insert(format!("{module}::{child}"));
                }
            }
        }
        deps.remove(module);
        if module == "(crate root)" {
            deps.remove("root");
        }
    }
    graph
}

/// The rows of the drawing in docs/architecture.md, in their order.
fn drawn() -> Vec<(String, BTreeSet<String>)> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md"),
    )
    .expect("read docs/architecture.md");
    let section = doc
        .split("### Imports")
        .nth(1)
        .expect("docs/architecture.md has a section \"### Imports\"");
    let block = section
        .split("```text")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Imports section draws the graph in a ```text block");
    let mut rows: Vec<(String, BTreeSet<String>)> = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (name, deps) = match line.split_once("->") {
            Some((n, d)) if !line.starts_with(' ') => (Some(n.trim().to_string()), d),
            _ => (None, line),
        };
        if let Some(name) = name {
            rows.push((name, BTreeSet::new()));
        }
        let row = &mut rows
            .last_mut()
            .expect("a continuation line follows a row")
            .1;
        for d in deps.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            if d != "(nothing)" {
                row.insert(d.to_string());
            }
        }
    }
    rows
}

fn render(graph: &BTreeMap<String, BTreeSet<String>>, order: &[String]) -> String {
    let mut out = String::new();
    for m in order {
        let deps = &graph[m];
        let list = if deps.is_empty() {
            "(nothing)".to_string()
        } else {
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        out.push_str(&format!("{m:<15} -> {list}\n"));
    }
    out
}

#[test]
fn the_drawn_import_graph_is_the_one_in_the_source() {
    let graph = derived();
    let rows = drawn();
    let order: Vec<String> = rows.iter().map(|(m, _)| m.clone()).collect();
    let mut missing: Vec<String> = graph
        .keys()
        .filter(|m| !order.contains(m))
        .cloned()
        .collect();
    missing.sort();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("modules not drawn: {missing:?}"));
    }
    for (module, deps) in &rows {
        match graph.get(module) {
            None => problems.push(format!("{module} is drawn but is no module of agent/src")),
            Some(actual) if actual != deps => {
                let added: Vec<_> = actual.difference(deps).collect();
                let dropped: Vec<_> = deps.difference(actual).collect();
                problems.push(format!(
                    "{module}: imports {added:?} not drawn; drawn {dropped:?} not imported"
                ));
            }
            Some(_) => {}
        }
    }
    // "lists each module after everything it imports"
    for (k, (module, deps)) in rows.iter().enumerate() {
        for d in deps {
            let d_row = if d == "root" {
                "(crate root)"
            } else {
                d.as_str()
            };
            match order.iter().position(|m| m == d_row) {
                Some(p) if p < k => {}
                _ => problems.push(format!("{module} is drawn before {d}, which it imports")),
            }
        }
    }
    let mut fixed = order.clone();
    fixed.extend(missing);
    fixed.retain(|m| graph.contains_key(m));
    assert!(
        problems.is_empty(),
        "docs/architecture.md's import graph is out of date:\n  {}\n\nthe source's graph, \
         in the drawing's order:\n{}",
        problems.join("\n  "),
        render(&graph, &fixed)
    );
}

/// The graph with each folder taken as one module (`fabric::liqo` is `fabric`, `root` the
/// crate root's row), without a folder's imports of itself.
fn folded(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| -> String {
        match m {
            "root" => "(crate root)".into(),
            m => m.split("::").next().unwrap_or(m).to_string(),
        }
    };
    let mut folded: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in graph {
        folded
            .entry(top(m))
            .or_default()
            .extend(deps.iter().map(|d| top(d)).filter(|d| *d != top(m)));
    }
    folded
}

#[test]
fn no_two_modules_import_each_other_with_folders_taken_whole() {
    let folded = folded(&derived());
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in folded.keys() {
        if let Some(cycle) = visit(m, &folded, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_derivation_sees_grouped_and_nested_paths() {
    // The parser this test relies on, on the shapes the source uses.
    let code = code_only(
        "use crate::{a::B, c::{d, e}, f};\n// crate::commented\nlet s = \"crate::quoted\";\n\
         let r = r#\"crate::raw\"#; let ch = '\"'; x = crate::g::h(); y = notcrate::i;\n\
         #[cfg(test)]\nmod tests { use crate::tested; }\n",
    );
    let code = without_tests(&code);
    let firsts: Vec<String> = paths_after(&code, "crate::")
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(firsts, ["a", "c", "f", "g"]);
}

#[test]
fn lib_rs_lists_each_module_after_what_it_imports() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read lib.rs");
    // The top-level entries of the crate doc's list: "//! - [`name`]" or "//! - `name`", and
    // the root's own items.
    let mut listed: Vec<String> = Vec::new();
    for line in lib.lines() {
        let Some(item) = line.strip_prefix("//! - ") else {
            continue;
        };
        if item.starts_with("the crate root") {
            listed.push("(crate root)".into());
        } else if let Some(name) = item
            .trim_start_matches('[')
            .strip_prefix('`')
            .and_then(|r| r.split('`').next())
        {
            listed.push(name.to_string());
        }
    }
    let folded = folded(&derived());
    let mut problems = Vec::new();
    for m in folded.keys() {
        if !listed.contains(m) {
            problems.push(format!("{m} is not in lib.rs's list"));
        }
    }
    for (k, m) in listed.iter().enumerate() {
        for d in folded.get(m).into_iter().flatten() {
            if !listed[..k].contains(d) {
                problems.push(format!("{m} imports {d}, listed after it"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "agent/src/lib.rs: {}",
        problems.join("; ")
    );
}

/// No `.unwrap()` or `.expect(` outside `#[cfg(test)]` in the gateway's, the supernode's or
/// the signer's source (comments and strings excluded): an input-derived value must give an
/// error in words, and the few values that cannot fail are written so that they need
/// neither.
#[test]
fn no_unwrap_or_expect_outside_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    for crate_src in ["agent/src", "supernode/src", "signer/src"] {
        let mut files = Vec::new();
        rs_files(&root.join(crate_src), &mut files);
        for f in files {
            if f.ends_with("tables/tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&f).expect("read source");
            let code = without_tests(&code_only(&text));
            for line in code.lines() {
                if line.contains(".unwrap()") || line.contains(".expect(") {
                    found.push(format!("{}: {}", f.display(), line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "unwrap/expect outside tests:\n{}",
        found.join("\n")
    );
}
