//! What each scenario is, in words: what happens, what lbtrace needs to tie the drops to the
//! VIP, and which kernel counter stands for them (`lab list`, a run's summary).

use super::scenarios::Scenario;

impl Scenario {
    /// What happens, and where the kernel drops.
    pub fn about(self) -> &'static str {
        match self {
            Scenario::Healthy => "nothing breaks: every VIP must show no loss and no drops",
            Scenario::FailoverGarp => "A's pod moves n0 → n1 (policy Local: n0 drops A from then on); 1 s later the speaker moves A (v4 and v6) with 3 gratuitous ARPs/NAs: loss lasts about that second",
            Scenario::StaleArp => "as failover, but the speaker sends no GARP: the client keeps n0's MAC until its entry goes stale (≈10 s with base_reachable_time_ms=2000). A (Local) is dropped on n0; B (Cluster), moved too, is forwarded by n0 with an extra hop and loses nothing",
            Scenario::LeaderFlap => "the speaker flips A between n0 (its endpoint) and n1 (none: dropped) every 3 s, with one GARP each time",
            Scenario::EndpointChurn => "kube-proxy in iptables mode. A's endpoint on n1 stops listening; kube-proxy still sends it half of A's flows until its sync removes it 1.5 s later (RSTs and port unreachables in the pod); 1.5 s after that it listens again and is added back. Twice",
            Scenario::ConntrackSnat => "from 2 s, n0 SNATs A's traffic to n1's pod to one address:port (one per family): every new flow there clashes at conntrack confirm (insert_failed)",
            Scenario::ConntrackFull => "at 3 s a burst of UDP flows from c1 to n0 fills n0's conntrack table (nf_conntrack_max lowered to 1024, restored after): new flows to A are dropped until the burst's entries expire (8 s)",
            Scenario::MtuMismatch => "from 2 s n0's path to n1's pods has MTU 1450: every large UDP request to A (1500 bytes, DF; IPv6 never fragments in transit) is dropped there with ICMP frag-needed / ICMPv6 packet-too-big, small ones and TCP pass",
            Scenario::PolicyRace => "at 3 s a new pod joins A's endpoints before its network-policy allow rule (a drop rule on n0, lifted at 8 s)",
            Scenario::NodeLoss => "at 3 s n0's link goes down (node loss); 1 s later the speaker moves A to n1 with 3 gratuitous ARPs/NAs. Meanwhile the client's frames to n0's MAC are flooded by the bridge and dropped by every other host as not theirs (OTHERHOST): lbtrace sees copies, never the loss",
            Scenario::SpeakerOom => "one speaker process per node elects A's leader over UDP heartbeats (7946); at 3 s n0's speaker, A's leader, allocates in its 48 MiB memory cgroup and is OOM-killed; n1's takes A over 0.5 s later with gratuitous ARPs/NAs",
            Scenario::MemberlistLoss => "one speaker process per node; from 3 s to 9 s n0 and n1 drop each other's heartbeats (nft, UDP 7946): both lead A and announce it, the client flips between them; then n1 gives A back",
            Scenario::SpeakerRestart => "one speaker process per node; at 3 s SIGTERM to n0's speaker, A's leader (it leaves and withdraws, n1 takes over); at 9 s it starts again and takes A back",
            Scenario::LateStart => "lbtrace starts 2 s in, after the client resolved A; at 4 s A moves n0 → n1 without GARP and n0 is taken out (forwarding off, kube-proxy no longer handles A there): n0 drops the client's packets as not its address (IP_INADDRERRORS) until the client's entry fails (≈10 s) and n1 answers its ARP/NDP request",
        }
    }

    /// What lbtrace needs to tie the drops to the VIP.
    pub fn needs(self) -> &'static str {
        match self {
            Scenario::Healthy => "nothing (no drops)",
            Scenario::NodeLoss => {
                "n0 as A's holder learned at start, and n1's announcement (the loss itself happens on no host lbtrace sees)"
            }
            Scenario::FailoverGarp
            | Scenario::StaleArp
            | Scenario::LeaderFlap
            | Scenario::ConntrackFull => {
                "the VIP in the dropped packet (dropped before DNAT)"
            }
            Scenario::LateStart => {
                "the VIP in the dropped packet; n0 as A's holder, learned at start from its configured address"
            }
            Scenario::ConntrackSnat | Scenario::MtuMismatch | Scenario::PolicyRace => {
                "the skb's conntrack entry (dropped after DNAT, in the node)"
            }
            Scenario::EndpointChurn => {
                "the node's DNAT carried across the veth (dropped in the pod, conntrack reference gone)"
            }
            Scenario::SpeakerOom | Scenario::MemberlistLoss | Scenario::SpeakerRestart => {
                "the speaker processes learned from their announcements, their exits, kills and starts, and the memberlist packets dropped between nodes"
            }
        }
    }

    /// Which kernel counter stands for the drops.
    pub fn kernel_counter(self) -> &'static str {
        match self {
            Scenario::EndpointChurn => {
                "per family, the endpoints' Udp NoPorts / Udp6NoPorts (/proc/net/snmp, snmp6) + the RSTs they sent (nft in the pods: Tcp OutRsts counts both families at once)"
            }
            Scenario::ConntrackSnat => {
                "per family, packets n0 passed towards n1's pods after NAT minus those that reached n1 (nft): what conntrack confirm dropped (insert_failed counts both families at once)"
            }
            Scenario::ConntrackFull => {
                "packets for the VIP before conntrack minus after it, on the owner node (nft)"
            }
            Scenario::MtuMismatch => {
                "Ip FragFails / Ip6FragFails of the owner node (/proc/net/snmp, snmp6): both families are refused in ip(6)_fragment"
            }
            Scenario::PolicyRace => {
                "the policy drop rule's counter for the VIP's endpoints, per family (nft)"
            }
            Scenario::NodeLoss => {
                "per family, A's TCP/UDP frames the bridge got for n0's MAC after n0's link went down (nft, bridge family): each one reached no host that takes it"
            }
            Scenario::LateStart => {
                "per family, A's TCP/UDP packets reaching n0 after it was taken out (nft; each one is dropped there, IP_INADDRERRORS), read from lbtrace's start"
            }
            _ => "kube-proxy's no-endpoint drop, all nodes (nft)",
        }
    }
}
