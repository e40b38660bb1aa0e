//! Text from outside: config files, tracefs `format` files, /proc/kallsyms,
//! /proc/net/stat/nf_conntrack and VIP strings.

use super::*;

/// `key = value` lines of a config, with keys and values right, wrong or bent.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        8 => prop::sample::select(vec![
            "vips",
            "metrics_addr",
            "node_name",
            "netns",
            "log_format",
            "events_file",
            "events_max_bytes",
            "probe_mode",
            "ring_size",
            "no_arp",
            "discover_vips",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z_\\[\\]. \"=]{0,10}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec![
            "[\"10.200.60.100\", \"10.200.61.0/28\"]",
            "[\"fd00:200::60:100/128\"]",
            "[\"10.0.0.300\"]",
            "[\"a\\nb\"]",
            "[\"\\u00e9\\t\"]",
            "[]",
            "[[1]]",
            "\"127.0.0.1:9464\"",
            "\"[::1]:80\"",
            "\"line\\nbreak\"",
            "\"\"",
            "\"auto\"",
            "\"tracepoint\"",
            "\"json\"",
            "4096",
            "4097",
            "0",
            "-1",
            "4294967296",
            "18446744073709551616",
            "1e3",
            "nan",
            "true",
            "1979-05-27T07:32:00Z",
            "{ a = 1 }",
            "'''multi\nline'''",
            "\"unterminated",
            "[",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,16}",
    ];
    prop::collection::vec((key, value, any::<bool>()), 0..8).prop_map(|lines| {
        lines
            .into_iter()
            .map(|(k, v, table)| {
                if table {
                    format!("{k} = {v}\n")
                } else {
                    format!("[{k}]\n{v}\n")
                }
            })
            .collect()
    })
}

pub(super) fn check_config(text: &str) -> TestCaseResult {
    match Config::parse(text) {
        Ok(c) => {
            prop_assert_eq!(c.vips.len(), c.file.vips.as_ref().map_or(0, Vec::len));
            if let Some(r) = c.file.ring_size {
                prop_assert!(r >= 4096 && r.is_power_of_two());
            }
            if let Some(m) = &c.file.probe_mode {
                prop_assert!(["auto", "btf", "tracepoint"].contains(&m.as_str()));
            }
        }
        Err(e) => prop_assert!(!e.is_empty() && !e.contains('\n'), "not one line: {e:?}"),
    }
    Ok(())
}

#[test]
fn fuzz_config_files() {
    fuzz(regressions!("config"), 2000, config_text(), |text| {
        check_config(&text)
    });
}

#[test]
fn fuzz_config_arbitrary_text() {
    fuzz(regressions!("config_text"), 2000, ".{0,200}", |text| {
        check_config(&text)
    });
}

/// A tracefs `format` file, fields in any order and spacing, some missing or renamed.
fn format_text() -> impl Strategy<Value = (String, Vec<(String, u32)>)> {
    let decl = prop::sample::select(vec![
        ("void * ", "skbaddr", ""),
        ("void *", "location", ""),
        ("enum skb_drop_reason ", "reason", ""),
        ("u8 ", "lladdr", "[32]"),
        ("__data_loc char[] ", "dev", ""),
        ("unsigned short ", "common_type", ""),
        ("int ", "family", ""),
    ]);
    let line = (decl, 0u32..4096, 0usize..3, any::<bool>());
    prop::collection::vec(line, 0..10).prop_map(|fields| {
        let mut text = String::from("name: kfree_skb\nID: 1\nformat:\n");
        let mut expect = Vec::new();
        for ((ty, name, suffix), off, spaces, garbled) in fields {
            let ws = " ".repeat(spaces);
            if garbled {
                text.push_str(&format!("\tfield:{ty}{name}{suffix};{ws}offset:x{off};\n"));
            } else {
                text.push_str(&format!(
                    "\tfield:{ty}{name}{suffix};{ws}\toffset:{off};\tsize:8;\tsigned:0;\n"
                ));
                expect.push((name.to_owned(), off));
            }
        }
        text.push_str("\nprint fmt: \"skbaddr=%p\", REC->skbaddr\n");
        (text, expect)
    })
}

#[test]
fn fuzz_tracefs_formats() {
    const WANTED: [&str; 5] = ["skbaddr", "location", "reason", "lladdr", "dev"];
    fuzz(
        regressions!("tracefs"),
        1000,
        format_text(),
        |(text, expect)| {
            match tracepoint_offsets(&text, &WANTED) {
                Ok(found) => {
                    for w in WANTED {
                        // The last declaration of a field wins, as the kernel would list it once.
                        let last = expect.iter().rev().find(|(n, _)| n == w).map(|(_, o)| *o);
                        prop_assert_eq!(found.get(w).copied(), last);
                    }
                }
                Err(e) => {
                    prop_assert!(
                        e.contains("missing from the tracepoint format") && !e.contains('\n')
                    );
                    prop_assert!(WANTED.iter().any(|w| !expect.iter().any(|(n, _)| n == w)));
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_tracefs_arbitrary_text() {
    fuzz(regressions!("tracefs_text"), 1000, ".{0,300}", |text| {
        if let Err(e) = tracepoint_offsets(&text, &["skbaddr", "reason"]) {
            prop_assert!(!e.contains('\n'));
        }
        Ok(())
    });
}

#[test]
fn fuzz_kallsyms_and_conntrack_stats() {
    fuzz(
        regressions!("proc_files"),
        1000,
        (
            prop::collection::vec((any::<u64>(), "[tTwWdDb?]{1,2}", "[a-z_.]{0,8}"), 0..20),
            ".{0,100}",
            prop::collection::vec(any::<u64>(), 0..8),
        ),
        |(syms, noise, probes)| {
            let text: String = syms
                .iter()
                .map(|(a, k, n)| format!("{a:016x} {k} {n}\n"))
                .chain(std::iter::once(noise.clone()))
                .collect();
            let k = Kallsyms::parse(&text);
            for addr in probes.iter().chain(syms.iter().map(|(a, _, _)| a)) {
                let s = k.symbolize(*addr);
                prop_assert!(!s.is_empty() && !s.contains('\n'));
                if k.function(*addr).is_none() || *addr == 0 {
                    prop_assert!(s.starts_with("0x"), "{s}");
                }
            }
            let _ = parse_ct_stat(&text);
            let _ = parse_ct_stat(&format!("entries insert_failed drop early_drop\n{noise}"));
            Ok(())
        },
    );
}

#[test]
fn fuzz_vip_strings() {
    fuzz(
        regressions!("vip_strings"),
        1000,
        "[0-9a-f:./ \\n]{0,24}",
        |s| {
            match parse_vip(&s) {
                Ok(net) => prop_assert!(
                    net.addr()
                        == s.trim()
                            .split('/')
                            .next()
                            .unwrap()
                            .parse::<IpAddr>()
                            .unwrap()
                ),
                Err(e) => prop_assert!(!e.is_empty()),
            }
            Ok(())
        },
    );
}
