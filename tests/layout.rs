//! The source layout's rules, checked on `src/` itself: no import cycle
//! between modules (a module may use its ancestors, not the other way round
//! through a detour), no file over 500 lines, no function over 80.
//!
//! A module is a file (`a/b.rs` and `a/b/mod.rs` are `a::b`). Its
//! dependencies are the `crate::…` and `super::…` paths outside comments,
//! each taken to the deepest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 500;
const MAX_FN_LINES: usize = 80;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `["a", "b"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The text without `//` comments (doc links are not imports) and
/// without string literals.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Every path the code names: `crate::a::b`, `super::x`, and the members
/// of `crate::{a, b::{c, d}}` groups.
fn paths_in(code: &str) -> Vec<(usize, Vec<String>)> {
    let bytes: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let boundary = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_' || bytes[i - 1] == ':');
        let (supers, start) = if boundary && rest.starts_with("crate::") {
            (0, i + 7)
        } else if boundary && rest.starts_with("super::") {
            let mut n = 0;
            let mut j = i;
            while bytes[j..].iter().take(7).collect::<String>() == "super::" {
                n += 1;
                j += 7;
            }
            (n, j)
        } else {
            i += 1;
            continue;
        };
        let (tree, end) = path_tree(&bytes, start);
        for p in tree {
            found.push((supers, p));
        }
        i = end.max(i + 1);
    }
    found
}

/// The paths of a use-tree starting at `at` (`a::b`, or `a::{b, c::d}`),
/// and where it ends.
fn path_tree(s: &[char], mut at: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        let skip = s[at..].iter().take_while(|c| c.is_whitespace()).count();
        at += skip;
        if s.get(at) == Some(&'{') {
            let mut out = Vec::new();
            at += 1;
            loop {
                let skip = s[at..].iter().take_while(|c| c.is_whitespace() || **c == ',').count();
                at += skip;
                match s.get(at) {
                    None => return (out, at),
                    Some('}') => return (out, at + 1),
                    _ => {}
                }
                let (inner, end) = path_tree(s, at);
                out.extend(inner.into_iter().map(|p| [prefix.clone(), p].concat()));
                if end == at {
                    at += 1;
                } else {
                    at = end;
                }
            }
        }
        let word: String = s[at..].iter().take_while(|c| c.is_alphanumeric() || **c == '_').collect();
        if word.is_empty() {
            return (vec![prefix], at);
        }
        at += word.chars().count();
        prefix.push(word);
        if s[at..].iter().take(2).collect::<String>() == "::" {
            at += 2;
        } else {
            return (vec![prefix], at);
        }
    }
}

struct Graph {
    modules: BTreeSet<Vec<String>>,
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    lines: Vec<(PathBuf, usize)>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| !f.ends_with("main.rs"));
    let mut modules = BTreeSet::new();
    let mut texts = Vec::new();
    let mut lines = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        lines.push((f.clone(), text.lines().count()));
        let module = module_of(&src, f);
        modules.insert(module.clone());
        texts.push((module, text));
    }
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, text) in &texts {
        // Test modules of a file may reach anything.
        let code = code_of(text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text));
        for (supers, path) in paths_in(&code) {
            // `super` of `a::b` is `a`, whether b is `a/b.rs` or `a/b/mod.rs`.
            let base = match supers {
                0 => Vec::new(),
                n => module[..module.len().saturating_sub(n)].to_vec(),
            };
            let full = [base, path].concat();
            let target = (0..=full.len()).rev().map(|n| full[..n].to_vec()).find(|m| modules.contains(m));
            if let Some(t) = target {
                let ancestor = module.starts_with(&t);
                if !ancestor && t != *module {
                    edges.entry(module.clone()).or_default().insert(t);
                }
            }
        }
    }
    Graph { modules, edges, lines }
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        let g = s.g;
        for w in g.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.stack.contains(&w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                comp.push(w.join("::"));
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), next: 0, out: Vec::new() };
    for m in &g.modules {
        if !s.index.contains_key(m) {
            visit(&mut s, m);
        }
    }
    s.out
}

#[test]
fn no_import_cycle_between_modules() {
    let g = graph();
    assert!(g.modules.len() > 50, "the walk found the modules: {}", g.modules.len());
    let session = vec!["frontend".to_string(), "session".to_string()];
    assert!(
        g.edges.get(&session).is_some_and(|d| d.contains(&vec!["protocol".to_string(), "tracker".to_string()])),
        "the scan sees the session's use of the tracker"
    );
    let found = cycles(&g);
    assert!(found.is_empty(), "modules that import each other (directly or through others): {found:?}");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut g = graph();
    let (a, b) = (vec!["sql".to_string()], vec!["proxy".to_string()]);
    g.edges.entry(a.clone()).or_default().insert(b.clone());
    g.edges.entry(b).or_default().insert(a);
    assert!(!cycles(&g).is_empty(), "sql -> proxy -> sql is a cycle");
}

#[test]
fn no_file_over_500_lines() {
    let g = graph();
    let long: Vec<_> = g.lines.iter().filter(|(_, n)| *n > MAX_LINES).collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

/// Functions of `code` longer than `max` lines: (first line, length).
fn long_functions(code: &str, max: usize) -> Vec<(usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub(crate) ").or(t.strip_prefix("pub(super) ")).or(t.strip_prefix("pub ")).unwrap_or(t);
        let t = t.strip_prefix("const ").unwrap_or(t);
        let t = t.strip_prefix("async ").unwrap_or(t);
        if !t.starts_with("fn ") {
            continue;
        }
        // The body: from the first `{` after the signature to its match.
        let (mut depth, mut opened) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if !opened && l.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            if opened && depth <= 0 {
                if j + 1 - i > max {
                    out.push((i + 1, j + 1 - i));
                }
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_over_80_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for f in &files {
        let code = code_of(&std::fs::read_to_string(f).expect("read source"));
        for (line, n) in long_functions(&code, MAX_FN_LINES) {
            long.push(format!("{}:{line} ({n} lines)", f.display()));
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FN_LINES} lines: {long:?}");
    let sample = format!("fn a() {{\n{}}}\n", "    x();\n".repeat(90));
    assert_eq!(long_functions(&sample, MAX_FN_LINES), vec![(1, 92)], "the check finds a long function");
}
