//! The keyring: the root key and the agent keys it has unwrapped, cached for the life of the
//! process so the hot path never runs an unwrap.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{AgentKey, RootError, RootKey};
use crate::ids::{AgentId, IssuerId};

/// Most unwrapped agent keys kept in memory; past it, an arbitrary entry is evicted (and
/// unwrapped again on its next use).
const CAPACITY: usize = 65_536;

/// An agent key in clear, with what the caller keeps beside it (the agent's registry entry).
#[derive(Debug)]
pub struct Unlocked<R> {
    /// The caller's record of the agent.
    pub record: R,
    /// The agent key: every new seal is made under it.
    pub key: AgentKey,
    /// The version a rotation of the agent key is retiring, while rows sealed under it remain:
    /// it opens them, and seals nothing.
    pub retiring: Option<AgentKey>,
    issuer: IssuerId,
}

impl<R> Unlocked<R> {
    /// The key of `version`, current or retiring, if this entry holds it.
    pub fn key_at(&self, version: u32) -> Option<&AgentKey> {
        if self.key.version == version {
            return Some(&self.key);
        }
        self.retiring.as_ref().filter(|key| key.version == version)
    }
}

/// The root key and the unwrapped agent keys, by (issuer, agent).
pub struct Keyring<R> {
    root: RootKey,
    /// Keyed by agent id, then matched on the issuer, so the hot path looks up by reference.
    /// A root rotation does not change agent keys, so an entry stays valid across one.
    agents: RwLock<HashMap<AgentId, Vec<Arc<Unlocked<R>>>>>,
}

impl<R> std::fmt::Debug for Keyring<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").finish_non_exhaustive()
    }
}

impl<R> Keyring<R> {
    /// A keyring over an unlocked root key, with no agent key yet.
    pub fn new(root: RootKey) -> Self {
        Self {
            root,
            agents: RwLock::new(HashMap::new()),
        }
    }

    /// The root key.
    pub fn root(&self) -> &RootKey {
        &self.root
    }

    /// The agent's key, if it was unlocked before.
    pub fn cached(&self, issuer: &IssuerId, agent: &AgentId) -> Option<Arc<Unlocked<R>>> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent)
            .and_then(|entries| entries.iter().find(|e| e.issuer == *issuer))
            .map(Arc::clone)
    }

    /// A new agent key (version 1) and its wrapping under the root key, bound to the agent.
    pub fn new_agent_key(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
    ) -> Result<(u32, Vec<u8>), RootError> {
        let key = AgentKey::generate(1);
        Ok((key.version, self.root.wrap_agent_key(issuer, agent, &key)?))
    }

    /// A new agent key of `version` and its wrapping under the root key, bound to the agent:
    /// the next version of a rotation.
    pub fn next_agent_key(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        version: u32,
    ) -> Result<(AgentKey, Vec<u8>), RootError> {
        let key = AgentKey::generate(version);
        let wrapped = self.root.wrap_agent_key(issuer, agent, &key)?;
        Ok((key, wrapped))
    }

    /// Drops the agent's cached key, so that its next use unwraps it again from the registry
    /// (after a rotation of it).
    pub fn forget(&self, issuer: &IssuerId, agent: &AgentId) {
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entries) = agents.get_mut(agent) {
            entries.retain(|e| e.issuer != *issuer);
            if entries.is_empty() {
                agents.remove(agent);
            }
        }
    }

    /// Drops every cached entry whose record `stale` picks; answers how many.
    pub fn forget_matching(&self, stale: impl Fn(&R) -> bool) -> usize {
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        let mut dropped = 0;
        agents.retain(|_, entries| {
            let before = entries.len();
            entries.retain(|e| !stale(&e.record));
            dropped += before - entries.len();
            !entries.is_empty()
        });
        dropped
    }

    /// Unwraps the agent's key from the first of `wraps` that opens under this root (during a
    /// root rotation an agent has a wrap under each root), and the key a rotation of it is
    /// retiring (`retiring`: its version and wrap), keeps them with `record`, and returns all.
    pub fn unlock(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        version: u32,
        wraps: &[&[u8]],
        retiring: Option<(u32, &[u8])>,
        record: R,
    ) -> Result<Arc<Unlocked<R>>, RootError> {
        let mut opened = Err(RootError::DoesNotOpen);
        for wrapped in wraps {
            opened = self.root.unwrap_agent_key(issuer, agent, version, wrapped);
            if !matches!(opened, Err(RootError::DoesNotOpen)) {
                break;
            }
        }
        let key = opened?;
        let retiring = retiring
            .map(|(version, wrapped)| self.root.unwrap_agent_key(issuer, agent, version, wrapped))
            .transpose()?;
        let entry = Arc::new(Unlocked {
            record,
            key,
            retiring,
            issuer: issuer.clone(),
        });
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        if agents.len() >= CAPACITY
            && let Some(evicted) = agents.keys().next().cloned()
        {
            agents.remove(&evicted);
        }
        let entries = agents.entry(agent.clone()).or_default();
        // Two reloads racing across a rotation: the newer key stays.
        if let Some(newer) = entries
            .iter()
            .find(|e| e.issuer == *issuer && e.key.version > entry.key.version)
        {
            return Ok(Arc::clone(newer));
        }
        entries.retain(|e| e.issuer != *issuer);
        entries.push(Arc::clone(&entry));
        Ok(entry)
    }
}
