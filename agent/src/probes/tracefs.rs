//! Checking tracepoint record layouts: the programs read fields at offsets compiled in from
//! `interlock-agent-common`, so before loading, the agent compares them with the running
//! kernel's `events/<category>/<name>/format` file and refuses a kernel that disagrees.

use std::fs;

use super::ProbeError;

const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One classic tracepoint a program attaches to, with the fields it reads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tracepoint {
    pub(crate) category: &'static str,
    pub(crate) name: &'static str,
    pub(crate) fields: &'static [(&'static str, usize)],
}

impl Tracepoint {
    fn label(&self) -> String {
        format!("{}:{}", self.category, self.name)
    }
}

/// Compares the running kernel's record layout with the offsets the program was built with.
/// Returns the tracefs root that was read.
pub(crate) fn check_layout(tracepoint: &Tracepoint) -> Result<&'static str, ProbeError> {
    let mut last_err = None;
    for root in TRACEFS_ROOTS {
        let path = format!(
            "{root}/events/{}/{}/format",
            tracepoint.category, tracepoint.name
        );
        match fs::read_to_string(&path) {
            Ok(format) => {
                let mismatches = layout_mismatches(&format, tracepoint.fields);
                if mismatches.is_empty() {
                    return Ok(root);
                }
                return Err(ProbeError::UnexpectedLayout {
                    tracepoint: tracepoint.label(),
                    detail: mismatches.join(", "),
                });
            }
            Err(source) => last_err = Some((path, source)),
        }
    }
    let (path, source) = last_err.expect("TRACEFS_ROOTS is not empty");
    Err(ProbeError::Tracefs { path, source })
}

/// Lists every field whose offset in `format` differs from ours, or that is missing.
pub(crate) fn layout_mismatches(format: &str, fields: &[(&str, usize)]) -> Vec<String> {
    fields
        .iter()
        .filter_map(|&(name, want)| match field_offset(format, name) {
            Some(got) if got == want => None,
            Some(got) => Some(format!("{name} at offset {got}, expected {want}")),
            None => Some(format!("{name} missing")),
        })
        .collect()
}

/// Finds `offset:N` of the field called `name` in a tracefs format file, whose lines look like
/// `field:__u16 sport;<TAB>offset:24;<TAB>size:2;<TAB>signed:0;`.
fn field_offset(format: &str, name: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let field_name = decl.rsplit([' ', '*']).next()?;
        let field_name = field_name.split('[').next()?;
        if field_name != name {
            return None;
        }
        let offset = rest.trim().strip_prefix("offset:")?.split(';').next()?;
        offset.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use interlock_agent_common::{inet_sock_set_state, mark_victim};

    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;\n\
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;\n\
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;\n\
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n\
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n\
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;\n";

    const MARK_VICTIM: &str = "name: mark_victim\nformat:\n\
\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n\
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;\n\
\tfield:unsigned long file_rss;\toffset:32;\tsize:8;\tsigned:0;\n\
\tfield:unsigned long shmem_rss;\toffset:40;\tsize:8;\tsigned:0;\n\
\tfield:uid_t uid;\toffset:48;\tsize:4;\tsigned:0;\n\
\tfield:unsigned long pgtables;\toffset:56;\tsize:8;\tsigned:0;\n\
\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;\n";

    #[test]
    fn the_layouts_we_compiled_against_are_accepted() {
        let fields = &inet_sock_set_state::FIELDS;
        assert_eq!(layout_mismatches(FORMAT, fields), Vec::<String>::new());
        let fields = &mark_victim::FIELDS;
        assert_eq!(layout_mismatches(MARK_VICTIM, fields), Vec::<String>::new());
    }

    #[test]
    fn a_moved_or_missing_field_is_named() {
        let fields = &inet_sock_set_state::FIELDS;
        let moved = FORMAT.replace("sport;\toffset:24", "sport;\toffset:22");
        assert_eq!(
            layout_mismatches(&moved, fields),
            vec!["sport at offset 22, expected 24"]
        );
        let missing = FORMAT.replace("daddr_v6", "dst_v6");
        assert_eq!(
            layout_mismatches(&missing, fields),
            vec!["daddr_v6 missing"]
        );
    }
}
