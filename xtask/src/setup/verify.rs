//! `cargo xtask setup --verify`: proves where every external file and program the project uses
//! came from, so a prerequisite installed by hand cannot hide behind a green CI.
//!
//! It asks the tools themselves what they read instead of keeping a list of files: `protoc
//! --dependency_out` names every `.proto` it opens (ours and etcd-client's, with the well-known
//! includes), and the C toolchain linking a program with rustc's link libraries under
//! `ld --trace` names every object and library it reads. Programs run by name are located the
//! way `Command::new` finds them (`PATH`, in order). Then each system file must be owned
//! (`dpkg -S`) by a package setup installs, or by a package such a package depends on (apt
//! brings it along; a *Recommends* does not count, since setup installs without recommends); the
//! cargo tool must be the one setup installs (`$CARGO_HOME/.crates2.json` records its version and
//! features); rustup components must be installed as components. Every failure names the
//! package or step to add to setup, and all failures are reported at once.
//!
//! Gathering (running dpkg, protoc, cc, rustup) and judging are kept apart: `judge_*` functions
//! take what was gathered as data and return verdicts, so the rules are unit-tested on tables.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    env,
    ffi::OsString,
    fs,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::manifest::{self, Locate, Program};
use crate::root;

/// One thing checked and what was concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What was checked, e.g. `program protoc` or `protoc include google/protobuf/any.proto`.
    pub subject: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Where it came from, e.g. `/usr/bin/protoc: protobuf-compiler`.
    Proven(String),
    /// Why not, and what to change.
    Failed(String),
}

impl Verdict {
    fn proven(subject: impl Into<String>, provenance: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            outcome: Outcome::Proven(provenance.into()),
        }
    }

    fn failed(subject: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            outcome: Outcome::Failed(why.into()),
        }
    }

    pub fn is_failed(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_))
    }
}

/// Runs every check against the real machine and the real manifest, prints one line per
/// subject and fails listing every problem.
pub fn run() -> anyhow::Result<()> {
    let packages = manifest::apt_names();
    let path_env = env::var_os("PATH").unwrap_or_default();
    let dpkg = Dpkg::load()?;
    let mut verdicts = judge_listed_installed(&packages, &dpkg);
    verdicts.extend(check_programs(
        manifest::PROGRAMS,
        &packages,
        &path_env,
        &dpkg,
    )?);
    verdicts.extend(check_protoc_includes(&packages, &path_env, &dpkg)?);
    verdicts.extend(check_linker_inputs(&packages, &path_env, &dpkg)?);
    verdicts.extend(check_rust(&path_env)?);
    verdicts.extend(check_mounts());
    report(&verdicts)
}

fn report(verdicts: &[Verdict]) -> anyhow::Result<()> {
    for v in verdicts {
        match &v.outcome {
            Outcome::Proven(how) => eprintln!("xtask: verify: ok   {}: {how}", v.subject),
            Outcome::Failed(why) => eprintln!("xtask: verify: FAIL {}: {why}", v.subject),
        }
    }
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| v.is_failed()).collect();
    if failed.is_empty() {
        eprintln!(
            "xtask: verify: every prerequisite ({}) comes from a step of setup",
            verdicts.len()
        );
        return Ok(());
    }
    let mut msg = format!(
        "{} of {} prerequisites are not provided by setup:",
        failed.len(),
        verdicts.len()
    );
    for v in failed {
        if let Outcome::Failed(why) = &v.outcome {
            msg.push_str(&format!("\n  - {}: {why}", v.subject));
        }
    }
    bail!(msg)
}

// ---------------------------------------------------------------------------------------------
// Debian's package database
// ---------------------------------------------------------------------------------------------

/// What dpkg knows about installed packages: their dependencies and the virtual packages they
/// provide. Ownership of files is asked separately ([`Dpkg::owners`]), in one batch.
#[derive(Debug, Default, Clone)]
pub struct Dpkg {
    /// Installed package → the packages each of its Depends/Pre-Depends clauses accepts.
    depends: BTreeMap<String, Vec<Vec<String>>>,
    /// Virtual package → installed packages that provide it.
    providers: BTreeMap<String, Vec<String>>,
}

impl Dpkg {
    pub fn load() -> anyhow::Result<Self> {
        let out = Command::new("dpkg-query")
            .args([
                "-W",
                "-f=${Package}\\t${db:Status-Abbrev}\\t${Depends}\\t${Pre-Depends}\\t${Provides}\\n",
            ])
            .output()
            .context("cannot run dpkg-query: this check needs a Debian system")?;
        if !out.status.success() {
            bail!(
                "dpkg-query failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Self::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Parses `dpkg-query -W` lines: package, status, Depends, Pre-Depends, Provides (tabs).
    pub fn parse(text: &str) -> Self {
        let mut dpkg = Self::default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            let [package, status, depends, pre_depends, provides] = fields[..] else {
                continue;
            };
            // "ii " is installed; anything else (config-files, half-installed) provides nothing.
            if !status.starts_with("ii") {
                continue;
            }
            let clauses: Vec<Vec<String>> = [depends, pre_depends]
                .iter()
                .flat_map(|field| field.split(','))
                .map(|clause| clause.split('|').map(package_name).collect::<Vec<_>>())
                .filter(|alts| alts.iter().any(|a| !a.is_empty()))
                .collect();
            dpkg.depends
                .entry(package.to_owned())
                .or_default()
                .extend(clauses);
            for virt in provides.split(',').map(package_name) {
                if !virt.is_empty() {
                    dpkg.providers
                        .entry(virt)
                        .or_default()
                        .push(package.to_owned());
                }
            }
        }
        dpkg
    }

    pub fn installed(&self, package: &str) -> bool {
        self.depends.contains_key(package)
    }

    /// The packages apt brings with `roots`: the roots that are installed and, transitively,
    /// every installed package that satisfies one of their Depends/Pre-Depends. Each maps to
    /// the chain that pulled it in (`["gcc", "gcc-12"]` for `libgcc-12-dev`).
    pub fn closure(&self, roots: &[&str]) -> BTreeMap<String, Vec<String>> {
        let mut via: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut queue = VecDeque::new();
        for root in roots {
            if self.installed(root) && !via.contains_key(*root) {
                via.insert((*root).to_owned(), Vec::new());
                queue.push_back((*root).to_owned());
            }
        }
        while let Some(pkg) = queue.pop_front() {
            let chain = via[&pkg].clone();
            for clause in self.depends.get(&pkg).into_iter().flatten() {
                for alt in clause {
                    let real = std::iter::once(alt.clone())
                        .filter(|a| self.installed(a))
                        .chain(self.providers.get(alt).into_iter().flatten().cloned());
                    for dep in real.collect::<Vec<_>>() {
                        if !via.contains_key(&dep) {
                            let mut c = chain.clone();
                            c.push(pkg.clone());
                            via.insert(dep.clone(), c);
                            queue.push_back(dep);
                        }
                    }
                }
            }
        }
        via
    }

    /// `dpkg -S` for many paths at once: path → owning packages (architecture suffix dropped).
    /// Paths no package owns are absent from the map.
    pub fn owners(paths: &BTreeSet<PathBuf>) -> anyhow::Result<BTreeMap<PathBuf, Vec<String>>> {
        if paths.is_empty() {
            return Ok(BTreeMap::new());
        }
        // dpkg -S exits 1 when any path is unowned; that is an answer, not an error.
        let out = Command::new("dpkg")
            .arg("-S")
            .args(paths)
            .output()
            .context("cannot run dpkg -S")?;
        Ok(parse_dpkg_search(
            &String::from_utf8_lossy(&out.stdout),
            paths,
        ))
    }
}

/// `libc6 (>= 2.34)` → `libc6`; `python3:any` → `python3`.
fn package_name(clause: &str) -> String {
    let name = clause.trim().split([' ', '(']).next().unwrap_or("");
    name.split(':').next().unwrap_or("").to_owned()
}

/// Parses `dpkg -S` output (`pkg[:arch][, pkg2]: /path`), keeping only lines for the paths
/// asked about (diversion lines are skipped).
pub fn parse_dpkg_search(text: &str, asked: &BTreeSet<PathBuf>) -> BTreeMap<PathBuf, Vec<String>> {
    let mut owners: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("diversion by") {
            continue;
        }
        let Some((pkgs, path)) = line.split_once(": ") else {
            continue;
        };
        let path = PathBuf::from(path.trim());
        if !asked.contains(&path) {
            continue;
        }
        let entry = owners.entry(path).or_default();
        for pkg in pkgs.split(", ") {
            let name = pkg.split(':').next().unwrap_or(pkg).trim();
            if !name.is_empty() && !entry.iter().any(|p| p == name) {
                entry.push(name.to_owned());
            }
        }
    }
    owners
}

// ---------------------------------------------------------------------------------------------
// System files: location, symlink hops, ownership
// ---------------------------------------------------------------------------------------------

/// A system file or program found on this machine (or not), and the package the manifest
/// expects to provide it, if it names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub subject: String,
    /// The package the manifest names for it; `None` for files a tool reported reading.
    pub expected: Option<String>,
    /// Where it was found, then each symlink target in turn (absolute). Empty: not found.
    pub hops: Vec<PathBuf>,
    /// Where it was looked for, for the message when it is missing.
    pub searched: String,
}

/// Looks a program up the way `Command::new` does: an absolute path as is, a bare name in each
/// `PATH` directory in order (the first executable file wins).
pub fn locate(program: Program, path_env: &OsString) -> Located {
    let (found, searched) = match program.locate {
        Locate::Absolute(path) => {
            let p = PathBuf::from(path);
            (is_executable(&p).then_some(p), path.to_owned())
        }
        Locate::Path(name) => (on_path(name, path_env), "in any PATH directory".to_owned()),
    };
    Located {
        subject: format!("program {}", display_locate(program.locate)),
        expected: Some(program.package.to_owned()),
        hops: found.map(|p| hops(&p)).unwrap_or_default(),
        searched,
    }
}

/// The first executable `name` in the `PATH` directories, in order (what `execvp` runs).
fn on_path(name: &str, path_env: &OsString) -> Option<PathBuf> {
    env::split_paths(path_env)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn display_locate(locate: Locate) -> String {
    match locate {
        Locate::Path(name) => name.to_owned(),
        Locate::Absolute(path) => path.to_owned(),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A file found at `path` (a tool reported reading it).
fn located_file(subject: String, path: &Path) -> Located {
    Located {
        subject,
        expected: None,
        hops: hops(path),
        searched: path.display().to_string(),
    }
}

/// `path` (its directories resolved, so `../` is gone) and each symlink target after it, at
/// most 16 hops (ELOOP's limit is 40; alternatives chains are 2–3 long).
fn hops(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut current = resolve_parent(path);
    for _ in 0..16 {
        out.push(current.clone());
        match fs::read_link(&current) {
            Ok(target) => {
                let next = if target.is_absolute() {
                    target
                } else {
                    current.parent().unwrap_or(Path::new("/")).join(target)
                };
                current = resolve_parent(&next);
            }
            Err(_) => break,
        }
    }
    out
}

/// Canonicalizes the directory part and keeps the last component as it is (a symlink stays a
/// symlink, so the package that owns the link itself can be found).
fn resolve_parent(path: &Path) -> PathBuf {
    let lexical: PathBuf = path.components().fold(PathBuf::new(), |mut acc, c| {
        match c {
            Component::ParentDir => {
                acc.pop();
            }
            Component::CurDir => {}
            other => acc.push(other),
        }
        acc
    });
    match (lexical.parent(), lexical.file_name()) {
        (Some(dir), Some(name)) => fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(lexical.clone()),
        _ => lexical,
    }
}

/// The other spellings of a path on a merged-/usr system: dpkg records `/bin/ip` although the
/// file is reached as `/usr/bin/ip` (and the reverse for packages built after the merge).
pub fn usrmerge_aliases(path: &Path) -> Vec<PathBuf> {
    let s = path.to_string_lossy();
    let mut out = vec![path.to_path_buf()];
    for (merged, legacy) in [
        ("/usr/bin/", "/bin/"),
        ("/usr/sbin/", "/sbin/"),
        ("/usr/lib/", "/lib/"),
        ("/usr/lib64/", "/lib64/"),
        ("/usr/sbin/", "/usr/bin/"),
        ("/usr/bin/", "/usr/sbin/"),
    ] {
        if let Some(rest) = s.strip_prefix(merged) {
            out.push(PathBuf::from(format!("{legacy}{rest}")));
        }
        if let Some(rest) = s.strip_prefix(legacy) {
            out.push(PathBuf::from(format!("{merged}{rest}")));
        }
    }
    out.dedup();
    out
}

/// Every path dpkg should be asked about for these located files.
fn ownership_queries(located: &[Located]) -> BTreeSet<PathBuf> {
    located
        .iter()
        .flat_map(|l| l.hops.iter())
        .flat_map(|h| usrmerge_aliases(h))
        .collect()
}

/// The verdict for one located file: the first hop some package owns decides (for
/// `cc → /etc/alternatives/cc → /usr/bin/gcc` that is gcc, which owns the alternative's
/// master), and that package must be setup's or pulled in by one of setup's.
pub fn judge_located(
    located: &Located,
    owners: &BTreeMap<PathBuf, Vec<String>>,
    allowed: &BTreeMap<String, Vec<String>>,
) -> Verdict {
    let Located {
        subject,
        expected,
        hops,
        searched,
    } = located;
    let Some(found) = hops.first() else {
        let fix = match expected {
            Some(pkg) => format!(
                "not found ({searched}); setup installs it with Debian's `{pkg}`: run `cargo xtask setup`"
            ),
            None => format!("not found ({searched})"),
        };
        return Verdict::failed(subject, fix);
    };
    let owned = hops.iter().find_map(|hop| {
        usrmerge_aliases(hop)
            .into_iter()
            .find_map(|alias| owners.get(&alias).map(|pkgs| (hop, pkgs)))
    });
    let Some((hop, pkgs)) = owned else {
        let fix = match expected {
            Some(pkg) => format!(
                "{} is owned by no Debian package (installed by hand?); remove it so Debian's \
                 `{pkg}` (which setup installs) provides it, or add the step that installs it to \
                 xtask/src/setup",
                found.display()
            ),
            None => format!(
                "{} is owned by no Debian package (installed by hand?); add the package that \
                 provides it to APT_PACKAGES in xtask/src/setup/manifest.rs and remove the copy",
                found.display()
            ),
        };
        return Verdict::failed(subject, fix);
    };
    if let Some(pkg) = pkgs.iter().find(|p| allowed.contains_key(*p)) {
        let chain = &allowed[pkg];
        let how = if chain.is_empty() {
            format!("{} ← {pkg}", hop.display())
        } else {
            format!("{} ← {pkg} (through {})", hop.display(), chain.join(" → "))
        };
        return Verdict::proven(subject, how);
    }
    let owner = pkgs.join(", ");
    let instead = match expected {
        Some(pkg) if allowed.contains_key(pkg) => format!(
            " (setup's `{pkg}` is installed, but {} is found first: remove that copy)",
            found.display()
        ),
        Some(pkg) => format!(" (or make setup's `{pkg}` provide it)"),
        None => String::new(),
    };
    Verdict::failed(
        subject,
        format!(
            "{} comes from Debian's `{owner}`, which setup does not install: add \"{}\" to \
             APT_PACKAGES in xtask/src/setup/manifest.rs{instead}",
            hop.display(),
            pkgs[0]
        ),
    )
}

/// Every listed package must be installed (setup has run and succeeded).
pub fn judge_listed_installed(packages: &[&str], dpkg: &Dpkg) -> Vec<Verdict> {
    packages
        .iter()
        .map(|pkg| {
            let subject = format!("package {pkg}");
            if dpkg.installed(pkg) {
                Verdict::proven(subject, "installed")
            } else {
                Verdict::failed(subject, "not installed: run `cargo xtask setup`")
            }
        })
        .collect()
}

fn judge_all(located: &[Located], packages: &[&str], dpkg: &Dpkg) -> anyhow::Result<Vec<Verdict>> {
    let owners = Dpkg::owners(&ownership_queries(located))?;
    let allowed = dpkg.closure(packages);
    Ok(located
        .iter()
        .map(|l| judge_located(l, &owners, &allowed))
        .collect())
}

/// Locates each program and judges where it came from.
pub fn check_programs(
    programs: &[Program],
    packages: &[&str],
    path_env: &OsString,
    dpkg: &Dpkg,
) -> anyhow::Result<Vec<Verdict>> {
    let located: Vec<Located> = programs.iter().map(|p| locate(*p, path_env)).collect();
    judge_all(&located, packages, dpkg)
}

// ---------------------------------------------------------------------------------------------
// What protoc and the linker read
// ---------------------------------------------------------------------------------------------

/// The directories whose `.proto` files are compiled during the build: ours, and etcd-client's
/// (its build script compiles the etcd API it bundles). Found through `cargo metadata`, so the
/// version in Cargo.lock is the one checked.
fn proto_roots() -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root())
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let etcd_client = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "etcd-client")
        .and_then(|p| p["manifest_path"].as_str())
        .context("Cargo.lock has no etcd-client package")?;
    let etcd_dir = Path::new(etcd_client)
        .parent()
        .context("etcd-client's manifest has no directory")?;
    Ok(vec![root().join("proto"), etcd_dir.join("proto")])
}

fn protos_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Bounded: the proto trees hold tens of files.
    while let Some(d) = stack.pop() {
        if out.len() > 10_000 {
            break;
        }
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "proto") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Parses a make-style dependency file (`out: a.proto \` newline `b.proto`).
pub fn parse_dependency_file(text: &str) -> Vec<String> {
    let body = text.split_once(": ").map_or(text, |(_, deps)| deps);
    // protoc writes `a.proto\` (no space) before a line break as well as a lone `\`.
    body.split_whitespace()
        .map(|w| w.strip_suffix('\\').unwrap_or(w))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Where the manifest's program `name` is found, or the verdict that what it reads (`subject`)
/// cannot be checked.
fn tool(name: &'static str, subject: &str, path_env: &OsString) -> Result<PathBuf, Verdict> {
    let program = manifest::PROGRAMS
        .iter()
        .find(|p| p.locate == Locate::Path(name))
        .copied()
        .unwrap_or(Program {
            locate: Locate::Path("(unlisted)"),
            package: "(unlisted)",
        });
    locate(program, path_env).hops.first().cloned().ok_or_else(|| {
        Verdict::failed(
            subject,
            format!(
                "{name} is not installed, so what it reads cannot be checked: run `cargo xtask setup`"
            ),
        )
    })
}

/// Asks protoc which files it reads for each proto root, and judges the ones outside the
/// crates' own sources (the workspace and cargo's registry).
pub fn check_protoc_includes(
    packages: &[&str],
    path_env: &OsString,
    dpkg: &Dpkg,
) -> anyhow::Result<Vec<Verdict>> {
    let protoc_path = match tool("protoc", "protoc includes", path_env) {
        Ok(path) => path,
        Err(v) => return Ok(vec![v]),
    };
    let tmp = tempfile::tempdir()?;
    let mut verdicts = Vec::new();
    let mut system: BTreeSet<PathBuf> = BTreeSet::new();
    for (i, proto_root) in proto_roots()?.iter().enumerate() {
        let files = protos_under(proto_root);
        if files.is_empty() {
            verdicts.push(Verdict::failed(
                format!("protos under {}", proto_root.display()),
                "no .proto files found: the proto root moved; update proto_roots in xtask/src/setup/verify.rs",
            ));
            continue;
        }
        // protoc accepts one input file per run when asked for a dependency file.
        for (j, file) in files.iter().enumerate() {
            let deps = tmp.path().join(format!("deps-{i}-{j}"));
            let out = Command::new(&protoc_path)
                .arg(format!("--proto_path={}", proto_root.display()))
                .arg(format!("--dependency_out={}", deps.display()))
                .arg(format!(
                    "--descriptor_set_out={}",
                    tmp.path().join("set").display()
                ))
                .arg(file)
                .current_dir(proto_root)
                .output()
                .context("cannot run protoc")?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let hint = if stderr.contains("google/protobuf/") {
                    " (the well-known google/protobuf/*.proto come with Debian's `libprotobuf-dev`)"
                } else {
                    ""
                };
                verdicts.push(Verdict::failed(
                    format!("protoc includes of {}", file.display()),
                    format!("protoc cannot compile it: {}{hint}", stderr.trim()),
                ));
                continue;
            }
            let text = fs::read_to_string(&deps)?;
            for dep in parse_dependency_file(&text) {
                let path = if Path::new(&dep).is_absolute() {
                    PathBuf::from(&dep)
                } else {
                    proto_root.join(&dep)
                };
                if !is_own_source(&path) {
                    system.insert(path);
                }
            }
        }
    }
    let located: Vec<Located> = system
        .iter()
        .map(|p| located_file(format!("protoc include {}", p.display()), p))
        .collect();
    verdicts.extend(judge_all(&located, packages, dpkg)?);
    Ok(verdicts)
}

/// Sources cargo fetched or the repository holds: not system files.
fn is_own_source(path: &Path) -> bool {
    let cargo_home = cargo_home();
    path.starts_with(root()) || cargo_home.as_deref().is_some_and(|h| path.starts_with(h))
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

/// Compiles and links a trivial C program with rustc's link libraries under `ld --trace`, and
/// judges every file the linker read plus the assembler and linker programs themselves.
pub fn check_linker_inputs(
    packages: &[&str],
    path_env: &OsString,
    dpkg: &Dpkg,
) -> anyhow::Result<Vec<Verdict>> {
    let cc_path = match tool("cc", "linker inputs", path_env) {
        Ok(path) => path,
        Err(v) => return Ok(vec![v]),
    };
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("main.c");
    fs::write(&src, "int main(void) { return 0; }\n")?;
    // Compile first, then link the object: the compiler's own temporaries would otherwise
    // show up among the linker's inputs.
    let object = tmp.path().join("main.o");
    let compiled = Command::new(&cc_path)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&object)
        .output()
        .context("cannot run cc")?;
    let mut cmd = Command::new(&cc_path);
    cmd.arg("-o")
        .arg(tmp.path().join("a.out"))
        .arg(&object)
        .arg("-Wl,--trace");
    for lib in manifest::LINK_LIBS {
        cmd.arg(format!("-l{lib}"));
    }
    let out = if compiled.status.success() {
        cmd.output().context("cannot run cc")?
    } else {
        compiled
    };
    if !out.status.success() {
        return Ok(vec![Verdict::failed(
            "linker inputs",
            format!(
                "cc cannot build a trivial program: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )]);
    }
    let mut files: BTreeSet<PathBuf> = parse_ld_trace(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|p| !p.starts_with(tmp.path()))
        .collect();
    for prog in ["ld", "as", "cc1"] {
        let named = Command::new(&cc_path)
            .arg(format!("-print-prog-name={prog}"))
            .output()?;
        let name = String::from_utf8_lossy(&named.stdout).trim().to_owned();
        let located = if Path::new(&name).is_absolute() {
            Some(PathBuf::from(&name))
        } else {
            on_path(&name, path_env)
        };
        if let Some(p) = located {
            files.insert(p);
        }
    }
    let located: Vec<Located> = files
        .iter()
        .map(|p| located_file(format!("linker input {}", p.display()), p))
        .collect();
    judge_all(&located, packages, dpkg)
}

/// `ld --trace` prints one input a line: a path, or `-lfoo (/path/libfoo.so)`.
pub fn parse_ld_trace(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match (line.find('('), line.rfind(')')) {
                (Some(a), Some(b)) if b > a => &line[a + 1..b],
                _ => line,
            };
            // A path has no spaces; `/usr/bin/ld: mode elf_x86_64` is the linker's own remark.
            (path.starts_with('/') && !path.contains(char::is_whitespace))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rust tools and components, mounts
// ---------------------------------------------------------------------------------------------

/// What was found of the cargo tool setup installs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CargoTool {
    /// Where `PATH` finds it.
    pub found: Option<PathBuf>,
    /// `$CARGO_HOME/bin`, where `cargo install` puts it.
    pub cargo_bin: Option<PathBuf>,
    /// Its record in `$CARGO_HOME/.crates2.json`: (version, features, no_default_features).
    pub record: Option<(String, Vec<String>, bool)>,
    /// Whether `bpf-linker --version` succeeds.
    pub runs: bool,
    /// The nightly's LLVM major, which its feature must name.
    pub llvm_major: Option<String>,
}

pub fn judge_bpf_linker(tool: &CargoTool) -> Verdict {
    let subject = format!("cargo tool {}", manifest::BPF_LINKER);
    let CargoTool {
        found,
        cargo_bin,
        record,
        runs,
        llvm_major,
    } = tool;
    let version = manifest::BPF_LINKER_VERSION;
    let Some(found) = found else {
        return Verdict::failed(
            subject,
            "not found on PATH: run `cargo xtask setup` (it installs bpf-linker into \
             $CARGO_HOME/bin with cargo install; that directory must be on PATH)",
        );
    };
    if cargo_bin.as_deref() != found.parent() {
        return Verdict::failed(
            subject,
            format!(
                "{} is found first, but setup installs it into {}: remove that copy",
                found.display(),
                cargo_bin
                    .as_deref()
                    .map_or_else(|| "$CARGO_HOME/bin".into(), |b| b.display().to_string())
            ),
        );
    }
    let Some((got, features, no_default)) = record else {
        return Verdict::failed(
            subject,
            format!(
                "{} has no record in $CARGO_HOME/.crates2.json (copied by hand?): remove it and \
                 run `cargo xtask setup`",
                found.display()
            ),
        );
    };
    let feature = llvm_major.as_deref().map(|m| format!("llvm-{m}"));
    let features_ok = feature
        .as_ref()
        .is_some_and(|f| features.iter().any(|x| x == f));
    if got != version || !features_ok || !no_default {
        return Verdict::failed(
            subject,
            format!(
                "installed as {got} with features {features:?} (default features {}), but setup \
                 installs {version} with only `{}` for nightly's LLVM: run `cargo uninstall \
                 bpf-linker` and `cargo xtask setup`",
                if *no_default { "off" } else { "on" },
                feature.as_deref().unwrap_or("llvm-<nightly's major>")
            ),
        );
    }
    if !runs {
        return Verdict::failed(
            subject,
            "installed by setup but `bpf-linker --version` fails (its libLLVM link in \
             ~/.cache/interlock/llvm is gone?): run `cargo uninstall bpf-linker` and `cargo xtask setup`",
        );
    }
    Verdict::proven(
        subject,
        format!(
            "{} ← cargo install bpf-linker {version} --features {}",
            found.display(),
            feature.unwrap_or_default()
        ),
    )
}

/// Reads `.crates2.json`'s record of one installed crate.
pub fn crates2_record(json: &str, krate: &str) -> Option<(String, Vec<String>, bool)> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let installs = value["installs"].as_object()?;
    installs.iter().find_map(|(key, info)| {
        let mut words = key.split_whitespace();
        (words.next()? == krate).then(|| {
            let version = words.next().unwrap_or("").to_owned();
            let features = info["features"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect();
            let no_default = info["no_default_features"].as_bool().unwrap_or(false);
            (version, features, no_default)
        })
    })
}

/// `rustup component list --installed` names components with their target (`rustfmt-x86_64-…`)
/// or without one (`rust-src`).
pub fn judge_component(toolchain: &str, component: &str, installed: &[String]) -> Verdict {
    let subject = format!("rustup component {component} ({toolchain})");
    if super::has_component(installed, component) {
        Verdict::proven(subject, "installed by rustup")
    } else {
        Verdict::failed(
            subject,
            format!(
                "not installed as a component: run `cargo xtask setup` (rustup component add \
                 {component} --toolchain {toolchain})"
            ),
        )
    }
}

fn check_rust(path_env: &OsString) -> anyhow::Result<Vec<Verdict>> {
    let mut verdicts = Vec::new();
    for (toolchain, component, _why) in manifest::RUST_COMPONENTS {
        match super::installed_components(toolchain) {
            Ok(installed) => verdicts.push(judge_component(toolchain, component, &installed)),
            Err(err) => verdicts.push(Verdict::failed(
                format!("rustup component {component} ({toolchain})"),
                format!("{err:#}"),
            )),
        }
    }
    let found = on_path(manifest::BPF_LINKER, path_env);
    let home = cargo_home();
    let record = home
        .as_ref()
        .and_then(|h| fs::read_to_string(h.join(".crates2.json")).ok())
        .and_then(|json| crates2_record(&json, manifest::BPF_LINKER));
    let runs = found.as_ref().is_some_and(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    verdicts.push(judge_bpf_linker(&CargoTool {
        found,
        cargo_bin: home.map(|h| h.join("bin")),
        record,
        runs,
        llvm_major: super::nightly_llvm_major().ok(),
    }));
    Ok(verdicts)
}

pub fn judge_mounts(proc_mounts: &str) -> Vec<Verdict> {
    manifest::MOUNTS
        .iter()
        .map(|(fstype, target)| {
            let subject = format!("mount {fstype} at {target}");
            if super::is_mounted(proc_mounts, fstype, target) {
                Verdict::proven(subject, "mounted")
            } else {
                Verdict::failed(subject, "not mounted: run `cargo xtask setup` as root")
            }
        })
        .collect()
}

fn check_mounts() -> Vec<Verdict> {
    judge_mounts(&fs::read_to_string("/proc/mounts").unwrap_or_default())
}

#[cfg(test)]
mod tests;
