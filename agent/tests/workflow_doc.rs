//! docs/workflow.md maps each of the seed workflow's 31 steps to the function that reports
//! it. This test holds the page to the code: every step 1-31 has a row, and each function
//! the row names in its "reported by" column exists in the file named and reports that step
//! (`.step(N, ...)` in its body). A step moved to another function without the page
//! following fails here.

use std::path::Path;

/// The body of `fn name` in `src` (from its `fn` to the matching closing brace).
fn body_of<'a>(src: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(at) = src[from..].find(&format!("fn {name}")) {
        let start = from + at;
        from = start + 3;
        let after = &src[start + 3 + name.len()..];
        if !after.starts_with('(') && !after.starts_with('<') {
            continue;
        }
        let open = start + src[start..].find('{')?;
        let mut depth = 0usize;
        for (k, ch) in src[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(&src[start..open + k + 1]);
                    }
                }
                _ => {}
            }
        }
    }
    None
}

fn reports(body: &str, step: u32) -> bool {
    let squeezed: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    squeezed.contains(&format!(".step({step},"))
}

#[test]
fn every_step_is_mapped_to_the_function_that_reports_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let page = std::fs::read_to_string(root.join("docs/workflow.md")).expect("docs/workflow.md");
    let mut seen = Vec::new();
    let mut problems = Vec::new();
    for line in page.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| step | element | what | reported by | work |" -> ["", step, ..., ""]
        let Some(step) = cells.get(1).and_then(|c| c.parse::<u32>().ok()) else {
            continue;
        };
        seen.push(step);
        let reported = cells.get(4).copied().unwrap_or("");
        // "`path` `fn`, `path` `fn`": pairs of code spans.
        let spans: Vec<&str> = reported.split('`').skip(1).step_by(2).collect();
        if spans.is_empty() || !spans.len().is_multiple_of(2) {
            problems.push(format!(
                "step {step}: \"reported by\" is not `file` `function` pairs"
            ));
            continue;
        }
        for pair in spans.chunks(2) {
            let (file, func) = (pair[0], pair[1]);
            let Ok(src) = std::fs::read_to_string(root.join(file)) else {
                problems.push(format!("step {step}: no file {file}"));
                continue;
            };
            match body_of(&src, func) {
                None => problems.push(format!("step {step}: no fn {func} in {file}")),
                Some(body) if !reports(body, step) => {
                    problems.push(format!("step {step}: {file} {func} does not report it"))
                }
                Some(_) => {}
            }
        }
    }
    let expected: Vec<u32> = (1..=31).collect();
    assert_eq!(
        seen, expected,
        "docs/workflow.md lists the steps 1-31, in order, once each"
    );
    assert!(
        problems.is_empty(),
        "docs/workflow.md: {}",
        problems.join("; ")
    );
}

#[test]
fn the_check_sees_a_function_that_does_not_report_its_step() {
    let src = "fn a() { shared.step(\n 3,\n \"x\", y); }\nfn b() { other(4); }\n";
    assert!(reports(body_of(src, "a").expect("a"), 3));
    assert!(!reports(body_of(src, "a").expect("a"), 4));
    assert!(!reports(body_of(src, "b").expect("b"), 4));
    assert!(body_of(src, "c").is_none());
}
