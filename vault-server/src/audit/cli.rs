//! The `vault-server audit` commands, run offline against a deployment's database: `verify`
//! walks every chain (or one agent's) from its anchor and reports the first broken record of
//! each, and `export` writes records as JSON lines. Both read a page of records and a page of
//! agents at a time, so a vault with many agents and long chains is never loaded whole.

use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use super::{Anchor, Broken, HeadKey, SignedHead, Stored, verify};
use crate::config::{DataSettings, DatabaseSettings};
use crate::ids::{AgentId, IssuerId};
use crate::store::{AgentPages, AgentRecord, Chain, Store, StoreError};
use crate::vault::UnlockedRoot;

/// Records read per query.
const RECORD_PAGE: u32 = 1000;
/// Agents read per query.
const AGENT_PAGE: u32 = 500;
/// How often a chain is walked again when retention moved its anchor during the walk.
const RETRIES: u32 = 3;

/// Which chains a command covers: every chain, or the agents named.
#[derive(Debug, Clone, Default)]
pub struct Which {
    /// Only this agent id (under any issuer unless `issuer` is given).
    pub agent: Option<AgentId>,
    /// Only agents of this issuer.
    pub issuer: Option<IssuerId>,
}

impl Which {
    /// From the command line's `--agent` and `--issuer`.
    pub fn parse(agent: Option<&str>, issuer: Option<&str>) -> anyhow::Result<Self> {
        Ok(Self {
            agent: agent
                .map(AgentId::parse)
                .transpose()
                .context("--agent is not a valid agent id")?,
            issuer: issuer
                .map(IssuerId::parse)
                .transpose()
                .context("--issuer is not a valid issuer")?,
        })
    }

    /// Whether the control chain is covered: only when no agent or issuer was named.
    fn control(&self) -> bool {
        self.agent.is_none() && self.issuer.is_none()
    }

    fn covers(&self, agent: &AgentRecord) -> bool {
        self.agent.as_ref().is_none_or(|id| *id == agent.agent)
            && self.issuer.as_ref().is_none_or(|iss| *iss == agent.issuer)
    }
}

/// One chain as the commands name it.
enum Target {
    Control,
    Agent(AgentRecord),
}

impl Target {
    fn chain(&self) -> Chain<'_> {
        match self {
            Self::Control => Chain::Control,
            Self::Agent(agent) => Chain::Agent(agent),
        }
    }

    /// How reports name the chain: `control`, or the agent with its issuer.
    fn label(&self) -> String {
        match self {
            Self::Control => "control".to_string(),
            Self::Agent(agent) => format!("agent {} (issuer {})", agent.agent, agent.issuer),
        }
    }
}

/// The chains `which` covers, a batch at a time: the control chain, then agents' in namespace
/// order.
struct Targets<'a> {
    store: &'a Store,
    which: &'a Which,
    control: bool,
    pages: AgentPages<'a>,
    /// With both agent and issuer named, the one registry lookup is done.
    looked_up: bool,
}

impl<'a> Targets<'a> {
    fn new(store: &'a Store, which: &'a Which) -> Self {
        Self {
            store,
            which,
            control: which.control(),
            pages: AgentPages::new(store.keys.as_ref(), AGENT_PAGE),
            looked_up: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Vec<Target>>, StoreError> {
        if std::mem::take(&mut self.control) {
            return Ok(Some(vec![Target::Control]));
        }
        if let (Some(agent), Some(issuer)) = (&self.which.agent, &self.which.issuer) {
            if std::mem::replace(&mut self.looked_up, true) {
                return Ok(None);
            }
            let found = self.store.keys.agent(issuer, agent).await?;
            return Ok(Some(found.into_iter().map(Target::Agent).collect()));
        }
        while let Some(page) = self.pages.next().await? {
            let covered: Vec<_> = page
                .into_iter()
                .filter(|agent| self.which.covers(agent))
                .map(Target::Agent)
                .collect();
            if !covered.is_empty() {
                return Ok(Some(covered));
            }
        }
        Ok(None)
    }
}

/// Opens the deployment's database, read-only in intent: it must be migrated already.
async fn open_store(database: &DatabaseSettings) -> anyhow::Result<Store> {
    let store = crate::store::open(database)
        .await
        .context("cannot open the database (VAULT_DATABASE_URL)")?;
    store
        .schema
        .ready()
        .await
        .context("the database is not ready (run `vault-server migrate`)")?;
    Ok(store)
}

/// Opens the database and unlocks the root key as `serve` does, for `audit verify`.
pub async fn open(settings: &DataSettings) -> anyhow::Result<(Store, UnlockedRoot)> {
    let source = crate::startup::root_key_source(&settings.root_key)?;
    let store = open_store(&settings.database).await?;
    // Unlocking would initialise a vault that has no root key yet; an audit command must not.
    if store.keys.root_key().await?.is_none() {
        anyhow::bail!("this database holds no vault yet: it has no root key record");
    }
    let root = crate::vault::unlock_root_key(&store, source).await?;
    Ok((store, root))
}

/// Opens the database for `audit export`, which needs no key.
pub async fn open_for_export(database: &DatabaseSettings) -> anyhow::Result<Store> {
    open_store(database).await
}

/// What `audit verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chains walked.
    pub chains: u64,
    /// Records checked.
    pub records: u64,
    /// Chains broken.
    pub broken: u64,
}

/// `audit verify`: walks every chain `which` covers, writing one line to `out` for each broken
/// chain (naming it and its first broken record) and a summary line at the end.
pub async fn verify_chains(
    store: &Store,
    key: &HeadKey,
    which: &Which,
    out: &mut impl Write,
) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut targets = Targets::new(store, which);
    while let Some(batch) = targets.next().await? {
        for target in batch {
            report.chains += 1;
            match verify_chain(store, key, target.chain()).await? {
                Ok(records) => report.records += records,
                Err((records, broken)) => {
                    report.records += records;
                    report.broken += 1;
                    writeln!(out, "broken: chain {}: {broken}", target.label())?;
                }
            }
        }
    }
    if report.chains == 0 {
        anyhow::bail!("no registered agent matches --agent/--issuer");
    }
    writeln!(
        out,
        "checked {} chain(s), {} record(s): {}",
        report.chains,
        report.records,
        match report.broken {
            0 => "all intact".to_string(),
            n => format!("{n} broken"),
        }
    )?;
    out.flush()?;
    Ok(report)
}

/// Walks one chain: `Ok(records checked)`, or the records checked and the first problem.
/// Retention deleting a prefix while the walk runs looks like a gap at its start; a walk that
/// saw the anchor move is done again.
async fn verify_chain(
    store: &Store,
    key: &HeadKey,
    chain: Chain<'_>,
) -> Result<Result<u64, (u64, Broken)>, StoreError> {
    let mut attempt = 0;
    loop {
        let anchor = store.audit.anchor(chain).await?;
        let outcome = walk(store, key, chain, anchor).await?;
        attempt += 1;
        if outcome.is_err() && attempt < RETRIES && store.audit.anchor(chain).await? != anchor {
            continue;
        }
        return Ok(outcome);
    }
}

/// [`verify`] over the pages of `chain` from `anchor`, against its signed head.
async fn walk(
    store: &Store,
    key: &HeadKey,
    chain: Chain<'_>,
    anchor: Anchor,
) -> Result<Result<u64, (u64, Broken)>, StoreError> {
    // Read before the records: every record it names was written before it was signed.
    let head = store.audit.signed_head(chain).await?;
    if let Some(head) = &head
        && (head.chain != chain.key() || !key.verifies(head))
    {
        // A head signed for another chain is as good as forged for this one.
        return Ok(Err((
            0,
            Broken::ForgedHead {
                chain: chain.key().to_string(),
            },
        )));
    }
    let mut last = anchor;
    let mut checked = 0;
    let mut head_seen = false;
    loop {
        let page = store
            .audit
            .records(chain, last.sequence, RECORD_PAGE)
            .await?;
        if page.is_empty() {
            break;
        }
        // `verify` checks the head against the page that holds its record.
        let here = head.as_ref().filter(|h| holds(&page, h));
        match verify(last, &page, here.map(|h| (key, h))) {
            Ok(next) => last = next,
            Err(broken) => return Ok(Err((checked, broken))),
        }
        head_seen |= here.is_some();
        checked += page.len() as u64;
        if page.len() < RECORD_PAGE as usize {
            break;
        }
    }
    if let Some(head) = &head
        && !head_seen
        && head.sequence > anchor.sequence
    {
        return Ok(Err((
            checked,
            Broken::Truncated {
                sequence: head.sequence,
                problem: "ends before it",
            },
        )));
    }
    Ok(Ok(checked))
}

fn holds(page: &[Stored], head: &SignedHead) -> bool {
    page.iter().any(|s| s.record.sequence == head.sequence)
}

/// `--since`: an RFC 3339 time, or a span back from `now` such as `90m`, `24h`, `7d` or `2w`.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let problem = || {
        format!(
            "--since {text:?}: expected an RFC 3339 time (2026-01-31T00:00:00Z) or a span such as 30m, 24h, 7d, 2w"
        )
    };
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(problem)?;
    let (count, unit) = text.split_at(unit_at);
    let count: i64 = count.parse().map_err(|_| problem())?;
    let span = match unit {
        "s" => chrono::Duration::try_seconds(count),
        "m" => chrono::Duration::try_minutes(count),
        "h" => chrono::Duration::try_hours(count),
        "d" => chrono::Duration::try_days(count),
        "w" => chrono::Duration::try_weeks(count),
        _ => None,
    }
    .ok_or_else(problem)?;
    now.checked_sub_signed(span).ok_or_else(problem)
}

/// `audit export`: writes every record of the chains `which` covers stamped at or after `since`
/// to `out`, one JSON object per line, chain by chain in sequence order. With `progress`, a bar
/// on stderr counts the chains. Returns how many records were written.
pub async fn export(
    store: &Store,
    which: &Which,
    since: DateTime<Utc>,
    progress: bool,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let since_ms = since.timestamp_millis();
    let bar = if progress {
        // Counting first costs a walk of the registry, not of the records.
        let mut total = 0;
        let mut targets = Targets::new(store, which);
        while let Some(batch) = targets.next().await? {
            total += batch.len() as u64;
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} chains {msg}")
                .context("the progress template")?,
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut written = 0;
    let mut chains = 0;
    let mut targets = Targets::new(store, which);
    while let Some(batch) = targets.next().await? {
        for target in batch {
            chains += 1;
            let chain = target.chain();
            let mut after = 0;
            loop {
                let page = store.audit.records(chain, after, RECORD_PAGE).await?;
                let Some(last) = page.last() else { break };
                after = last.record.sequence;
                let mut lines = Vec::new();
                for stored in page.iter().filter(|s| s.record.at_ms >= since_ms) {
                    serde_json::to_writer(&mut lines, &json_line(chain.key(), stored))?;
                    lines.push(b'\n');
                    written += 1;
                }
                // Printing under the bar would tear it when stdout is the same terminal.
                bar.suspend(|| out.write_all(&lines))?;
                if page.len() < RECORD_PAGE as usize {
                    break;
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    out.flush()?;
    if chains == 0 {
        anyhow::bail!("no registered agent matches --agent/--issuer");
    }
    Ok(written)
}

/// One exported record: every field, times in RFC 3339, digests and hashes in hex.
fn json_line(chain: &str, stored: &Stored) -> serde_json::Value {
    let r = &stored.record;
    let at = DateTime::<Utc>::from_timestamp_millis(r.at_ms)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    serde_json::json!({
        "chain": chain,
        "sequence": r.sequence,
        "at": at,
        "action": r.action,
        "agent": r.agent,
        "user": r.user,
        "tool": r.tool,
        "outcome": r.outcome.as_str(),
        "generation": r.generation,
        "caller_iss": r.caller_iss,
        "caller_jti": r.caller_jti,
        "caller_digest": r.caller_digest.map(hex::encode),
        "verified": r.verified,
        "peer": r.peer,
        "trace_id": r.trace_id,
        "target": r.target,
        "hash": hex::encode(stored.hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-02-01T12:00:00Z")
            .expect("a valid literal")
            .with_timezone(&Utc)
    }

    #[test]
    fn since_reads_an_rfc_3339_time_or_a_span_back_from_now() {
        assert_eq!(
            parse_since("2026-01-31T13:00:00+01:00", now()).unwrap(),
            DateTime::parse_from_rfc3339("2026-01-31T12:00:00Z").unwrap()
        );
        assert_eq!(
            parse_since("24h", now()).unwrap(),
            now() - chrono::Duration::hours(24)
        );
        assert_eq!(
            parse_since("7d", now()).unwrap(),
            now() - chrono::Duration::days(7)
        );
        assert_eq!(
            parse_since("90m", now()).unwrap(),
            now() - chrono::Duration::minutes(90)
        );
        for bad in [
            "",
            "h",
            "7",
            "7y",
            "-3d",
            "yesterday",
            "99999999999999999999d",
        ] {
            assert!(parse_since(bad, now()).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_exported_record_has_every_field_and_no_more() {
        let stored = Stored {
            record: super::super::AuditRecord {
                sequence: 3,
                at_ms: 1_769_947_200_123,
                action: "GetToken".into(),
                agent: Some("agent-a".into()),
                caller_digest: Some([0xab; 32]),
                verified: true,
                ..Default::default()
            },
            hash: [1; 32],
        };
        let line = json_line("control", &stored);
        let object = line.as_object().expect("an object");
        assert_eq!(object.len(), 17);
        assert_eq!(line["at"], "2026-02-01T12:00:00.123Z");
        assert_eq!(line["outcome"], "OK");
        assert_eq!(line["caller_digest"], "ab".repeat(32));
        assert_eq!(line["hash"], "01".repeat(32));
        assert_eq!(line["user"], serde_json::Value::Null);
    }
}
