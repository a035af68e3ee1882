//! Crypto-shredding an agent (`shred-agent`): its key is destroyed with every row sealed under
//! it, and its identity is never registered again (DESIGN §5: deleting an agent key shreds the
//! agent).

use crate::audit::{Changes, Recorder};
use crate::ids::{AgentId, IssuerId};
use crate::store::{AgentPages, Shred, ShredPlan, Store};

use super::rotation::{RotationError, record_key_event};

/// The audit action recorded before an agent is shredded (fail closed: no record, no shred).
pub const AGENT_SHRED_STARTED: &str = "key.agent_shred_started";
/// The audit action recorded once it is, with what it held.
pub const AGENT_SHREDDED: &str = "key.agent_shredded";

/// The issuers under which an agent with this id is registered, for `shred-agent --agent`
/// without `--issuer`.
pub async fn issuers_of(store: &Store, agent: &AgentId) -> Result<Vec<IssuerId>, RotationError> {
    let mut pages = AgentPages::new(store.keys.as_ref(), 1000);
    let mut found = Vec::new();
    while let Some(page) = pages.next().await? {
        found.extend(
            page.into_iter()
                .filter(|record| record.agent == *agent)
                .map(|record| record.issuer),
        );
    }
    Ok(found)
}

/// Shreds `agent` of `issuer` as `plan` says: a dry run only counts; otherwise the shred is
/// recorded before (and after) it happens.
pub async fn shred_agent(
    store: &Store,
    issuer: &IssuerId,
    agent: &AgentId,
    plan: ShredPlan,
) -> Result<Shred, RotationError> {
    let counted = store
        .keys
        .shred_agent(
            issuer,
            agent,
            ShredPlan {
                dry_run: true,
                ..plan
            },
        )
        .await?;
    match counted {
        Shred::WouldShred(counts) if plan.dry_run => return Ok(Shred::WouldShred(counts)),
        Shred::WouldShred(counts) if counts.revocations > 0 && !plan.abandon_revocations => {
            return Ok(Shred::RevocationsPending(counts));
        }
        Shred::WouldShred(_) => {}
        other => return Ok(other),
    }
    let recorder = Recorder::new(store.clone(), Changes::default());
    let target = |extra: serde_json::Value| {
        let mut target = serde_json::json!({ "issuer": issuer.as_str(), "agent": agent.as_str() });
        if let (Some(map), serde_json::Value::Object(extra)) = (target.as_object_mut(), extra) {
            map.extend(extra);
        }
        target
    };
    record_key_event(
        &recorder,
        AGENT_SHRED_STARTED,
        target(serde_json::json!({})),
    )
    .await?;
    let shred = store.keys.shred_agent(issuer, agent, plan).await?;
    if let Shred::Shredded(done) = shred {
        if done.revocations > 0 {
            tracing::warn!(
                agent = %agent,
                abandoned = done.revocations,
                "provider revocations abandoned with the shredded agent"
            );
        }
        record_key_event(
            &recorder,
            AGENT_SHREDDED,
            target(serde_json::json!({
                "credentials": done.credentials,
                "revocations_abandoned": done.revocations,
                "flows": done.flows,
                "audit_records": done.audit_records,
            })),
        )
        .await?;
    }
    Ok(shred)
}
