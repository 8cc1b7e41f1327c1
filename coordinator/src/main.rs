//! `interlock`: the coordinator server (`interlock serve`) and the operator CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use interlock_coordinator::{
    cli::{self, ClientArgs, OperatorCommand},
    serve::{self, ServeOptions, StoreChoice},
    tls::{self, Security},
};
use interlock_proto::tls::TlsFiles;

#[derive(Parser)]
#[command(
    name = "interlock",
    version,
    about = "Interlock coordinator and operator CLI"
)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator replica.
    Serve(Box<ServeArgs>),
    /// Make a CA and issue certificates for the coordinator, hosts and operators.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Bearer tokens for automation, and the break-glass token.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Turn on etcd's authentication for Interlock (once per cluster; idempotent): a role that
    /// may read and write only the prefix, a user with just that role, root, and auth enabled.
    EtcdBootstrap(EtcdBootstrapArgs),
    #[command(flatten)]
    Operator(OperatorCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Policy file (TOML): action classes and their safety cases.
    #[arg(long)]
    config: PathBuf,
    /// etcd endpoints, comma-separated. Without it the embedded single-node store is used
    /// (one-host quickstart only).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The CA that signed etcd's certificate (PEM), for https:// etcd endpoints.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    /// The certificate the coordinator presents to etcd; with etcd's --client-cert-auth its
    /// common name is the etcd user (`interlock certs issue etcd-user interlock`).
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// Its private key (mode 0600).
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_ca", "etcd_cert"])]
    etcd_key: Option<PathBuf>,
    /// Where the embedded store keeps its log (without --etcd). Omit to keep it in memory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Every key lives under this prefix.
    #[arg(long, default_value = "/interlock")]
    prefix: String,
    /// gRPC address to listen on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: String,
    /// Address clients use to reach this replica (default: http://<listen>).
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address for /metrics, /healthz and /readyz ("" to disable).
    #[arg(long, default_value = "127.0.0.1:7401")]
    metrics_listen: String,
    /// How long a host stays registered without heartbeats.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    host_ttl: Duration,
    /// Leadership lease TTL; a dead leader is replaced within about this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    election_ttl: Duration,
    /// Audit records kept in the store (at least 100); the oldest are deleted beyond that.
    #[arg(long, default_value_t = 100_000)]
    audit_retention: u64,
    /// The CA that signs every host's and operator's certificate (PEM).
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    ca: Option<PathBuf>,
    /// This coordinator's certificate (PEM; `interlock certs init` writes coordinator.pem).
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    cert: Option<PathBuf>,
    /// Its private key (mode 0600).
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    key: Option<PathBuf>,
    /// The trust domain of identities (`spiffe://DOMAIN/host/ID`); default: the
    /// `trust-domain` file beside --ca, else "interlock".
    #[arg(long)]
    trust_domain: Option<String>,
    /// Identities refused everything, one a line (`host:<id>`, `operator:<name>`); re-read
    /// within a second of a change, and a newly denied host's live leases are revoked.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    deny_file: Option<PathBuf>,
    /// Bearer tokens for automation (`NAME SHA256HEX` a line, mode 0600; `interlock tokens
    /// new`): a caller without a client certificate may present one as operator NAME, with the
    /// role the policy gives NAME. Re-read within a second of a change.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    token_file: Option<PathBuf>,
    /// The hash of the one break-glass token (`interlock tokens break-glass`): admin whatever
    /// the policy says; every use is audited and alerted.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    break_glass_file: Option<PathBuf>,
    /// The CA's private key (mode 0600): hosts may then enrol with join tokens (`interlock
    /// certs token`) and renew their certificates over mTLS; this coordinator signs them.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    ca_key: Option<PathBuf>,
    /// How long a certificate signed for an enrolling or renewing host lasts; agents renew
    /// when a third of it is left.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    host_cert_lifetime: Duration,
    /// Serve plaintext and trust the identities requests claim. For trying things out only:
    /// logs a warning at start and shows in `interlock status`.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    insecure: bool,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Make a token for operator NAME and add its hash to FILE (created 0600); the token is
    /// printed once and stored nowhere. Grant NAME a role in the policy's [access.operators].
    New {
        name: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Make the break-glass token and write its hash to FILE (never overwritten); keep the
    /// printed token offline. Every use is audited and alerted.
    BreakGlass {
        #[arg(long)]
        file: PathBuf,
    },
}

fn tokens_cmd(command: TokensCommand) -> anyhow::Result<()> {
    use interlock_coordinator::{identity, tokens};
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let token = tokens::new_token().context("reading /dev/urandom")?;
    match command {
        TokensCommand::New { name, file } => {
            if !identity::valid_name(&name) || name == identity::BREAK_GLASS {
                anyhow::bail!(
                    "{name:?} is not a usable operator name: letters, digits, '.', '_', '-' \
                     (and not {:?})",
                    identity::BREAK_GLASS
                );
            }
            let existing = std::fs::read_to_string(&file).unwrap_or_default();
            tokens::Tokens::parse(&existing).map_err(|lines| {
                anyhow::anyhow!("{} has bad lines: {}", file.display(), lines.join("; "))
            })?;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            writeln!(f, "{name} {}", tokens::hash(&token))
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", file.display()))?;
            println!(
                "{token}\n(operator:{name}'s token: shown once; send it as `authorization: Bearer \
                 <token>` or INTERLOCK_TOKEN; grant a role under [access.operators])"
            );
        }
        TokensCommand::BreakGlass { file } => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| {
                    format!(
                        "creating {} (an existing break-glass file is never overwritten; \
                         remove it to replace the credential)",
                        file.display()
                    )
                })?;
            writeln!(f, "{}", tokens::hash(&token))
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", file.display()))?;
            println!(
                "{token}\n(the break-glass token: shown once; keep it offline; every use is \
                 audited and alerted)"
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct EtcdBootstrapArgs {
    /// etcd's https:// client endpoints, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// The CA that signed etcd's certificate.
    #[arg(long, value_name = "FILE")]
    etcd_ca: PathBuf,
    /// A client certificate: root's (`interlock certs issue etcd-user root`).
    #[arg(long, value_name = "FILE")]
    etcd_cert: PathBuf,
    #[arg(long, value_name = "FILE")]
    etcd_key: PathBuf,
    /// Interlock's key prefix (as given to `interlock serve --prefix`).
    #[arg(long, default_value = "/interlock")]
    prefix: String,
    /// The etcd user the coordinator connects as (its --etcd-cert's common name).
    #[arg(long, default_value = "interlock")]
    user: String,
    /// The role granted read/write on the prefix.
    #[arg(long, default_value = "interlock")]
    role: String,
}

async fn etcd_bootstrap_cmd(args: EtcdBootstrapArgs) -> anyhow::Result<()> {
    let steps = interlock_coordinator::etcd_bootstrap::run(
        &interlock_coordinator::etcd_bootstrap::Bootstrap {
            endpoints: args.etcd,
            tls: TlsFiles {
                ca: args.etcd_ca,
                cert: args.etcd_cert,
                key: args.etcd_key,
            },
            prefix: args.prefix,
            user: args.user.clone(),
            role: args.role,
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    for s in steps {
        println!("{s}");
    }
    println!(
        "etcd now authenticates every client; connect the coordinator with --etcd-ca, and \
         --etcd-cert/--etcd-key for user {}",
        args.user
    );
    Ok(())
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create DIR with a new CA (ca.pem, ca.key) and the coordinator's certificate.
    Init {
        dir: PathBuf,
        /// Trust domain written into every identity.
        #[arg(long, default_value = interlock_coordinator::certs::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// More names (DNS or IP) for the coordinator's certificate besides localhost and
        /// 127.0.0.1; repeat for each replica's address.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
    },
    /// Issue a certificate signed by DIR's CA.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Ask the coordinator for a one-time join token for HOST (admin role; the coordinator
    /// must run with --ca-key): the agent enrols with `interlock-agent enrol --token`.
    Token {
        #[arg(long)]
        host: String,
        /// How long the token may be used (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum IssueCommand {
    /// An agent's certificate, binding its host id.
    Host {
        host: String,
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value_t = interlock_coordinator::certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// An operator's certificate; the role is granted in the policy's [access.operators].
    Operator {
        name: String,
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value_t = interlock_coordinator::certs::DEFAULT_DAYS)]
        days: u32,
        /// The role to grant (printed as the policy line to add): viewer, approver, operator, admin.
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    /// The certificate an etcd server presents (--cert-file/--key-file; ca.pem is its
    /// --trusted-ca-file): etcd/server.pem for localhost, 127.0.0.1 and each --server-name.
    EtcdServer {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        #[arg(long, default_value_t = interlock_coordinator::certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// A client certificate for etcd user USER (its common name): `interlock` for the
    /// coordinator (--etcd-cert), `root` for `interlock etcd-bootstrap` once auth is on.
    EtcdUser {
        user: String,
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value_t = interlock_coordinator::certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// Re-issue the coordinator's certificate (e.g. with more --server-name).
    Coordinator {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        #[arg(long, default_value_t = interlock_coordinator::certs::DEFAULT_DAYS)]
        days: u32,
    },
}

async fn certs_cmd(client: &ClientArgs, command: CertsCommand) -> anyhow::Result<ExitCode> {
    use interlock_coordinator::{
        certs::{self, Validity},
        identity::Identity,
    };
    match command {
        CertsCommand::Token { host, ttl } => return cli::join_token(client, &host, ttl).await,
        CertsCommand::Init {
            dir,
            trust_domain,
            server_names,
        } => {
            let issued = certs::init(&dir, &trust_domain, &server_names)?;
            println!(
                "CA {} (key {}, 0600); coordinator certificate {} (key {})",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display(),
                issued.cert.display(),
                issued.key.display()
            );
        }
        CertsCommand::Issue(IssueCommand::Host { host, dir, days }) => {
            let issued = certs::issue(
                &dir,
                &Identity::Host(host.clone()),
                Validity::from_now(days),
            )?;
            println!(
                "host:{host}: {} (key {}, 0600); name them in the agent's [coordinator] ca/cert/key",
                issued.cert.display(),
                issued.key.display()
            );
        }
        CertsCommand::Issue(IssueCommand::Operator {
            name,
            dir,
            days,
            role,
        }) => {
            if !matches!(role.as_str(), "viewer" | "approver" | "operator" | "admin") {
                anyhow::bail!("unknown role {role:?}; use viewer, approver, operator or admin");
            }
            let issued = certs::issue(
                &dir,
                &Identity::Operator(name.clone()),
                Validity::from_now(days),
            )?;
            println!(
                "operator:{name}: {} (key {}, 0600)\ngrant the role in the policy:\n  [access.operators]\n  {name} = \"{role}\"",
                issued.cert.display(),
                issued.key.display()
            );
        }
        CertsCommand::Issue(IssueCommand::EtcdServer {
            dir,
            server_names,
            days,
        }) => {
            let issued = certs::issue_etcd_server(&dir, &server_names, Validity::from_now(days))?;
            println!(
                "etcd server: {} (key {}); start etcd with --cert-file, --key-file, \
                 --trusted-ca-file {} and --client-cert-auth",
                issued.cert.display(),
                issued.key.display(),
                dir.join("ca.pem").display()
            );
        }
        CertsCommand::Issue(IssueCommand::EtcdUser { user, dir, days }) => {
            let issued = certs::issue_etcd_user(&dir, &user, Validity::from_now(days))?;
            println!(
                "etcd user {user}: {} (key {}, 0600)",
                issued.cert.display(),
                issued.key.display()
            );
        }
        CertsCommand::Issue(IssueCommand::Coordinator {
            dir,
            server_names,
            days,
        }) => {
            let issued = certs::issue_coordinator(&dir, &server_names, Validity::from_now(days))?;
            println!(
                "coordinator: {} (key {})",
                issued.cert.display(),
                issued.key.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve_cmd(*args).await.map(|()| ExitCode::SUCCESS),
            Command::Certs(command) => certs_cmd(&cli.client, command).await,
            Command::Tokens(command) => tokens_cmd(command).map(|()| ExitCode::SUCCESS),
            Command::EtcdBootstrap(args) => {
                etcd_bootstrap_cmd(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Operator(command) => cli::run(&cli.client, command).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Mutual TLS from the flags (every file checked now), or `--insecure`.
fn security(args: &ServeArgs) -> anyhow::Result<Security> {
    if args.insecure {
        return Ok(Security::Insecure);
    }
    let (Some(ca), Some(cert), Some(key)) = (&args.ca, &args.cert, &args.key) else {
        anyhow::bail!("give --ca, --cert and --key (see `interlock certs init`), or --insecure");
    };
    let trust_domain = match &args.trust_domain {
        Some(td) => td.clone(),
        None => ca
            .parent()
            .and_then(|d| interlock_coordinator::certs::trust_domain(d).ok())
            .unwrap_or_else(|| interlock_coordinator::certs::DEFAULT_TRUST_DOMAIN.to_owned()),
    };
    let files = TlsFiles {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    };
    let mut security = tls::server_security(&files, &trust_domain)?;
    if let Some(ca_key) = &args.ca_key {
        if args.host_cert_lifetime < Duration::from_secs(10) {
            anyhow::bail!("--host-cert-lifetime must be at least 10s");
        }
        let signer = interlock_coordinator::certs::Signer::load(
            ca,
            ca_key,
            &trust_domain,
            args.host_cert_lifetime,
        )?;
        if let Security::Mtls { signer: s, .. } = &mut security {
            *s = Some(std::sync::Arc::new(signer));
        }
    }
    if args.token_file.is_some() || args.break_glass_file.is_some() {
        let source = tls::TokenSource::load(args.token_file.clone(), args.break_glass_file.clone())
            .map_err(anyhow::Error::msg)?;
        if let Security::Mtls { tokens, .. } = &mut security {
            *tokens = Some(std::sync::Arc::new(source));
        }
    }
    if let (Some(path), Security::Mtls { deny, .. }) = (&args.deny_file, &mut security) {
        *deny = Some((
            path.clone(),
            interlock_coordinator::deny::DenyList::from_file(path)?,
        ));
    }
    Ok(security)
}

async fn serve_cmd(args: ServeArgs) -> anyhow::Result<()> {
    let security = security(&args)?;
    let policy_text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read the policy file {}", args.config.display()))?;
    let grpc = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick a free address with --listen",
                args.listen
            )
        })?;
    let http = if args.metrics_listen.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&args.metrics_listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} for metrics; pick another with --metrics-listen",
                        args.metrics_listen
                    )
                })?,
        )
    };
    let failpoint = std::env::var("INTERLOCK_FAILPOINT_PAUSE_BEFORE_GRANT_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let options = ServeOptions {
        store: if args.etcd.is_empty() {
            StoreChoice::Embedded(args.data_dir)
        } else {
            StoreChoice::Etcd {
                endpoints: args.etcd,
                tls: match (args.etcd_ca, args.etcd_cert, args.etcd_key) {
                    (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
                    _ => None,
                },
            }
        },
        policy_name: args.config.display().to_string(),
        policy_text,
        prefix: args.prefix,
        advertise: args.advertise,
        host_ttl: args.host_ttl,
        election_ttl: args.election_ttl,
        failpoint_pause_before_grant_commit: failpoint,
        audit_retention: args.audit_retention,
        security,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
        }
    };
    serve::run(options, grpc, http, shutdown).await?;
    Ok(())
}
