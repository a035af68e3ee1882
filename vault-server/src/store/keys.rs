//! The key tables: the root key's check value and the agent registry, which holds each agent's
//! key wrapped by the root key and the schema its credentials live in.

use crate::crypto::KdfParams;
use crate::ids::{AgentId, IssuerId};

use super::StoreError;

/// A registered agent: where its credentials live and its wrapped key.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    /// The issuer that vouches for the agent.
    pub issuer: IssuerId,
    /// The agent.
    pub agent: AgentId,
    /// Its schema, as the registry names it: a hash of the identity, or the random name of the
    /// spare schema it took.
    pub namespace: String,
    /// The agent key, wrapped by the root key.
    pub wrapped_key: Vec<u8>,
    /// The agent key's version.
    pub key_version: u32,
    /// During a root rotation, the same agent key wrapped by the next root, once re-wrapped.
    pub next_wrapped_key: Option<Vec<u8>>,
    /// During a rotation of this agent's key, the version it retires, still wrapped by the root
    /// until no row is sealed under it.
    pub retiring: Option<RetiringKey>,
}

/// An agent key version a rotation is retiring: reads still open rows sealed under it, no write
/// seals under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiringKey {
    /// Its version.
    pub version: u32,
    /// It, wrapped by the root key.
    pub wrapped_key: Vec<u8>,
}

/// Root key metadata kept in the control schema.
#[derive(Debug, Clone)]
pub struct RootKeyRecord {
    /// Seal of a constant under the root key.
    pub key_check: Vec<u8>,
    /// Argon2id salt and costs when the key comes from a passphrase.
    pub kdf: Option<(Vec<u8>, KdfParams)>,
    /// The control key wrapped by the root key; `None` in a vault initialised before there was
    /// one, whose control key is the root key's bytes.
    pub wrapped_control_key: Option<Vec<u8>>,
    /// The root being rotated to, while a rotation is in progress.
    pub next: Option<NextRoot>,
}

/// The root key a rotation in progress moves to.
#[derive(Debug, Clone)]
pub struct NextRoot {
    /// Seal of the key-check constant under the next root.
    pub key_check: Vec<u8>,
    /// Its Argon2id salt and costs, when it comes from a passphrase.
    pub kdf: Option<(Vec<u8>, KdfParams)>,
    /// The control key wrapped by the next root.
    pub wrapped_control_key: Vec<u8>,
}

/// What `shred-agent` may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShredPlan {
    /// Shred even with provider revocations still queued (they are abandoned).
    pub abandon_revocations: bool,
    /// Count what would be destroyed, and destroy nothing.
    pub dry_run: bool,
}

/// What an agent held when it was shredded (or would have been).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShredCounts {
    /// Stored credentials.
    pub credentials: u64,
    /// Provider revocations still queued.
    pub revocations: u64,
    /// Consent flows not yet cleaned up.
    pub flows: u64,
    /// Records of the agent's audit chain.
    pub audit_records: u64,
}

/// How a shred ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shred {
    /// The agent's key, rows and (PostgreSQL) schema are gone; a tombstone keeps the identity.
    Shredded(ShredCounts),
    /// A dry run: this is what a shred would destroy.
    WouldShred(ShredCounts),
    /// Provider revocations are still queued and were not to be abandoned: nothing changed.
    RevocationsPending(ShredCounts),
    /// No such agent is registered (any more).
    NotRegistered,
}

/// Where a root rotation's switch stands.
#[derive(Debug)]
pub enum RotationSwitch {
    /// The next root is now the root: `agents` agent keys moved to it.
    Done {
        /// Agent keys that moved.
        agents: u64,
    },
    /// These agents (registered since the last batch) have no wrap under the next root yet;
    /// nothing changed. Re-wrap them and switch again.
    Missing(Vec<AgentRecord>),
    /// No rotation is in progress (another run finished it, or it was aborted).
    NotPending,
}

/// The root key record and the agent registry.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The root key metadata, if the vault has been initialised.
    async fn root_key(&self) -> Result<Option<RootKeyRecord>, StoreError>;

    /// Records root key metadata unless a record exists already (another replica was first).
    async fn insert_root_key(&self, record: &RootKeyRecord) -> Result<(), StoreError>;

    /// Records root key metadata unless another replica did first; returns what is stored.
    async fn init_root_key(&self, record: &RootKeyRecord) -> Result<RootKeyRecord, StoreError> {
        self.insert_root_key(record).await?;
        self.root_key()
            .await?
            .ok_or_else(|| StoreError::Corrupt("root key row vanished".into()))
    }

    /// The agent's registry entry, if it has stored anything.
    async fn agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
    ) -> Result<Option<AgentRecord>, StoreError>;

    /// Registers the agent with `wrapped_key` and creates its schema, unless a concurrent call
    /// already did; returns the stored entry either way. Only while `key_check` is the current
    /// root's key check ([`StoreError::RootKeyChanged`] otherwise): a server whose root was
    /// rotated away must not register an agent under it.
    async fn create_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        wrapped_key: &[u8],
        key_version: u32,
        key_check: &[u8],
    ) -> Result<AgentRecord, StoreError>;

    /// Starts a root rotation to `next`, unless one is in progress already; returns the stored
    /// record either way (its `next` is the rotation in progress, which may be another's).
    async fn begin_root_rotation(&self, next: &NextRoot) -> Result<RootKeyRecord, StoreError>;

    /// Forgets a rotation in progress: the next root's key check and every wrap under it.
    /// False if none was in progress.
    async fn abort_root_rotation(&self) -> Result<bool, StoreError>;

    /// At most `limit` registered agents whose key has no wrap under the next root yet, in
    /// namespace order.
    async fn agents_to_rewrap(&self, limit: u32) -> Result<Vec<AgentRecord>, StoreError>;

    /// Records `next_wrapped_key` as the agent's key wrapped by the next root, provided its
    /// key is still the one `record` holds and the rotation in progress is still the one to the
    /// root whose stored key check is `next_key_check`; false otherwise.
    async fn set_next_wrap(
        &self,
        record: &AgentRecord,
        next_wrapped_key: &[u8],
        next_key_check: &[u8],
    ) -> Result<bool, StoreError>;

    /// (re-wrapped, registered) agents of the rotation in progress.
    async fn rewrap_progress(&self) -> Result<(u64, u64), StoreError>;

    /// The switch, in one transaction that holds off agent registration: if every agent has a
    /// wrap under the next root, makes those wraps, the next key check and the next control
    /// key wrap current and forgets the old ones; otherwise changes nothing and answers which
    /// agents still need one. Only the rotation to the root whose stored key check is
    /// `next_key_check` is switched; any other state answers [`RotationSwitch::NotPending`].
    async fn finish_root_rotation(
        &self,
        next_key_check: &[u8],
    ) -> Result<RotationSwitch, StoreError>;

    /// Crypto-shreds an agent in one transaction: deletes its key row (the only wrap of its
    /// key), its consent flows, and its credentials, queued revocations and audit chain (on
    /// PostgreSQL by dropping its schema, then its role), and records a tombstone so that the
    /// identity is never registered again.
    async fn shred_agent(
        &self,
        issuer: &IssuerId,
        agent: &AgentId,
        plan: ShredPlan,
    ) -> Result<Shred, StoreError>;

    /// At most `limit` registered agents in namespace order, those after `after` (a namespace)
    /// when given: pages through every agent without loading them all at once, for work that
    /// walks every agent (signing audit heads, retention, `audit verify`). Agents from before
    /// identities named their issuer ([`KeyStore::legacy_agents`]) are not listed until adopted.
    async fn agents(&self, after: Option<&str>, limit: u32)
    -> Result<Vec<AgentRecord>, StoreError>;

    /// Agents registered before identities named their issuer: (agent, key version, wrapped
    /// key). Their keys are wrapped without an issuer binding.
    async fn legacy_agents(&self) -> Result<Vec<(AgentId, u32, Vec<u8>)>, StoreError>;

    /// Gives a legacy agent to `issuer` with its key re-wrapped for it; false if another
    /// replica already did.
    async fn adopt_agent(
        &self,
        agent: &AgentId,
        issuer: &IssuerId,
        wrapped_key: &[u8],
    ) -> Result<bool, StoreError>;
}

/// Every registered agent, a page at a time in namespace order ([`KeyStore::agents`]).
pub struct AgentPages<'a> {
    keys: &'a dyn KeyStore,
    page: u32,
    after: Option<String>,
    done: bool,
}

impl<'a> AgentPages<'a> {
    /// Pages of at most `page` agents (at least 1) from `keys`.
    pub fn new(keys: &'a dyn KeyStore, page: u32) -> Self {
        Self {
            keys,
            page: page.max(1),
            after: None,
            done: false,
        }
    }

    /// The next page, or `None` once every agent was returned.
    pub async fn next(&mut self) -> Result<Option<Vec<AgentRecord>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let page = self.keys.agents(self.after.as_deref(), self.page).await?;
        // A short page is the last: no need to ask for an empty one.
        self.done = page.len() < self.page as usize;
        match page.last() {
            Some(last) => self.after = Some(last.namespace.clone()),
            None => return Ok(None),
        }
        Ok(Some(page))
    }
}
