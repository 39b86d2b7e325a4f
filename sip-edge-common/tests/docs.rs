//! The README's map and reason tables are the one place an operator reads
//! what each map holds and what each counter means: they must name every
//! map and every reason, with the code the datapath counts it under.

use sip_edge_common::{map_names, Reason};

fn readme() -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn readme_map_table_names_every_map() {
    let doc = readme();
    for name in map_names::ALL.iter().chain(map_names::BENCH.iter()) {
        let row = format!("| `{name}` |");
        let row_pair = format!("`{name}` /");
        let pair_second = format!("/ `{name}` |");
        assert!(
            doc.lines().any(|l| l.starts_with(&row)
                || (l.starts_with("| `") && (l.contains(&row_pair) || l.contains(&pair_second)))),
            "README's map table has no row for {name}"
        );
    }
}

#[test]
fn readme_reason_table_gives_every_reason_its_code() {
    let doc = readme();
    for r in Reason::ALL {
        let row = format!("| {} | `{}` |", r as u32, r.name());
        assert!(
            doc.lines().any(|l| l.starts_with(&row)),
            "README's reason table has no row `{row}`"
        );
    }
}
