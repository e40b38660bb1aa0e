//! The portability suite: which integration tests run in every guest, under which item of the
//! issue, and the guest's /init that runs them and powers off.
//!
//! The tests are the host's own (tests/tests/*.rs), compiled once and copied into the guest:
//! the same kernel-side oracles (tracefs `skb/kfree_skb`, nft counters,
//! /proc/net/stat/nf_conntrack, what the workload sent) judge lbtrace on every kernel.

use super::initramfs::BOOT_MODULES;

/// One check of the suite.
pub struct Check {
    /// What it proves, as the report names it.
    pub item: &'static str,
    /// Test binary (tests/tests/<bin>.rs).
    pub bin: &'static str,
    /// Exact test name.
    pub test: &'static str,
}

const fn c(item: &'static str, bin: &'static str, test: &'static str) -> Check {
    Check { item, bin, test }
}

/// Lean on purpose: each runs under TCG, which is 10–50 times slower than the host.
pub const CHECKS: &[Check] = &[
    c(
        "doctor",
        "portability",
        "doctor_names_the_probe_in_use_and_why_not_the_others",
    ),
    c("reasons", "portability", "reasons_match_the_kernels_enum"),
    c(
        "kfree_skb args",
        "portability",
        "doctor_states_how_drops_without_device_or_socket_are_placed",
    ),
    c("NO_SOCKET v4", "drops", "drop_in_other_netns_over_veth_btf"),
    c("NO_SOCKET v4", "drops", "tcp_syn_to_closed_port_btf"),
    c("nft drop", "drops", "nftables_drop_rule_btf"),
    c("IPv6", "drops", "tcp_syn_to_closed_port_ipv6_btf"),
    c("IPv6", "drops", "nftables_drop_rule_ipv6_btf"),
    c(
        "conntrack insert_failed",
        "conntrack",
        "snat_exhaustion_counts_insert_failed_exactly",
    ),
    c(
        "conntrack table_full",
        "conntrack",
        "full_table_counts_table_full_exactly",
    ),
    c(
        "conntrack hooks = statistics",
        "conntrack",
        "hooks_and_statistics_count_the_same",
    ),
    c(
        "DNAT attribution",
        "conntrack",
        "dnat_drops_in_pod_netns_carry_the_vip",
    ),
    c(
        "GARP + ownership",
        "arp",
        "garp_move_is_seen_with_both_macs_and_the_client_update",
    ),
    c(
        "tracepoint mode",
        "drops",
        "tcp_syn_to_closed_port_tracepoint",
    ),
    c("tracepoint mode", "drops", "nftables_drop_rule_tracepoint"),
    c(
        "in-kernel counting",
        "drops",
        "watch_above_its_sample_limit_counts_every_drop_exactly",
    ),
    c(
        "verifier headroom",
        "portability",
        "the_drop_program_leaves_the_verifier_headroom",
    ),
];

/// The self-test: with the kernel's BTF edited so that `net_device.ifindex` resolves to
/// another member's offset, this check must fail.
pub const SELF_TEST: Check = c("self-test", "drops", "tcp_syn_to_closed_port_btf");

/// Test binaries the guest needs.
pub fn binaries() -> Vec<&'static str> {
    let mut b: Vec<&str> = CHECKS.iter().map(|c| c.bin).collect();
    b.sort_unstable();
    b.dedup();
    b
}

/// Seconds one test may take in the guest before it counts as failed.
const TEST_TIMEOUT: u32 = 300;

/// The guest's /init: mount, load modules, doctor, each check between markers, power off.
/// With `fault`, the kernel's BTF is replaced by a broken copy first and only the self-test runs.
pub fn init_script(fault: bool) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LBTRACE_BIN=/bin/lbtrace RUST_BACKTRACE=0
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs nodev /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
ip link set lo up
"#,
    );
    // Built in on the cloud kernels, a module on the rt ones; libcrc32c cannot load without it.
    s.push_str("[ -d /sys/module/crc32c_generic ] || modprobe crc32c_generic\n");
    s.push_str(&format!("modprobe -a {}\n", BOOT_MODULES.join(" ")));
    s.push_str("echo \"VMTEST-KERNEL $(uname -r)\"\n");
    if fault {
        s.push_str(
            "btf-fault /sys/kernel/btf/vmlinux /tmp/vmlinux.broken net_device ifindex mtu \
             && mount --bind /tmp/vmlinux.broken /sys/kernel/btf/vmlinux\n",
        );
    } else {
        s.push_str("echo VMTEST-DOCTOR-BEGIN\nlbtrace doctor 2>&1\necho VMTEST-DOCTOR-END\n");
    }
    let checks: Vec<&Check> = if fault {
        vec![&SELF_TEST]
    } else {
        CHECKS.iter().collect()
    };
    for c in checks {
        s.push_str(&format!(
            "echo 'VMTEST-BEGIN {t}'\ntimeout {TEST_TIMEOUT} /t/{b} --exact {t} --test-threads=1 --show-output 2>&1\necho \"VMTEST-END {t} $?\"\n",
            t = c.test,
            b = c.bin,
        ));
    }
    s.push_str("echo VMTEST-DONE\npoweroff -f\n");
    s
}
