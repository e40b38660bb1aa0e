//! What lbtrace reads from the running kernel outside its programs: BTF, symbols, tracefs,
//! network namespaces, conntrack tables and this process's privileges.

pub mod btf;
pub mod conntrack;
pub mod kallsyms;
pub mod kubeproxy;
pub mod netns;
pub mod privileges;
pub mod rtnl;
pub mod tracefs;
