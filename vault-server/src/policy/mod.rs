//! Least privilege (DESIGN §11): the operator's policy file (`VAULT_POLICY_FILE`, TOML) says
//! which tools each agent may use, and for each tool its scope ceiling, its TTL maximum, its rate
//! limits and whether it needs a step-up. It is compiled once per load into a [`Policy`] that
//! answers every question from memory; [`PolicyHandle`] swaps in a new one on reload without a
//! lock on the hot path.
//!
//! ```toml
//! [[grants]]                       # the tools an agent may use: the union of every grant
//! name = "support"                 # whose `agents` matches it (exact ids, or globs with * ?)
//! agents = ["support-bot", "support-*"]
//! tools = ["jira", "confluence"]   # tool names, or "*" for every tool
//!
//! [tools.stripe]
//! scopes = ["read_only"]           # the scope ceiling: a credential holds no other scope
//! max_ttl_seconds = 3600           # a tighter TTL maximum than SECRETS_TTL_SECONDS
//! approval = "required"            # GetToken and Refresh need a recent step-up
//! limits.agent = { per_second = 10, burst = 20 }
//! limits.user = { per_second = 0.5, burst = 2 }
//!
//! [approval]                       # what a step-up is: claims of the caller's JWT
//! acr = ["urn:example:mfa"]        # `acr` is one of these
//! amr = ["otp", "hwk"]             # `amr` holds one of these
//! max_age_seconds = 300            # required: `auth_time` is at most this old
//! ```
//!
//! No file: every agent may use every tool, as before the policy existed.

mod limits;
mod reload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

pub use limits::{Limited, Limits, Quota};
pub use reload::{PolicyHandle, PolicyReload};

use crate::auth::{Caller, StepUp};
use crate::ids::{AgentId, Tool};

/// The most grants, tools and patterns a file may hold: far above any real deployment, and a
/// bound on what one reload may cost.
const MAX_ENTRIES: usize = 100_000;

/// Why a call is outside the policy, naming the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The rule, as the file names it: `grants`, `tools.stripe.approval`, …
    pub rule: String,
    /// What the caller is told.
    pub message: String,
}

/// Scopes over a tool's ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverCeiling {
    /// The rule: `tools.<tool>.scopes`.
    pub rule: String,
    /// What is over, and what is allowed.
    pub problem: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    grants: Vec<GrantEntry>,
    #[serde(default)]
    tools: BTreeMap<String, ToolEntry>,
    approval: Option<ApprovalEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    name: Option<String>,
    agents: Vec<String>,
    tools: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolEntry {
    scopes: Option<Vec<String>>,
    max_ttl_seconds: Option<u64>,
    #[serde(default)]
    approval: ApprovalMode,
    #[serde(default)]
    limits: LimitsEntry,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ApprovalMode {
    #[default]
    None,
    Required,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsEntry {
    agent: Option<QuotaEntry>,
    user: Option<QuotaEntry>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaEntry {
    per_second: f64,
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalEntry {
    #[serde(default)]
    acr: Vec<String>,
    #[serde(default)]
    amr: Vec<String>,
    max_age_seconds: Option<u64>,
}

/// What a tool's entry in the file says, compiled.
#[derive(Debug)]
pub struct ToolRule {
    /// The scope ceiling, when set.
    scopes: Option<BTreeSet<String>>,
    /// The TTL maximum, when set.
    pub max_ttl_seconds: Option<u64>,
    /// GetToken and Refresh need a step-up.
    approval: bool,
    /// The tool's own rate limits (charged besides the global ones).
    pub limits: Arc<Limits>,
}

/// What a step-up is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Approval {
    acr: Vec<String>,
    amr: Vec<String>,
    /// Required: a step-up proves something only while it is recent.
    max_age_seconds: u64,
}

impl Approval {
    /// Why `step_up` (at `now`, unix seconds) is not a step-up, if it is not.
    fn unmet(&self, step_up: &StepUp, now: i64) -> Option<String> {
        if !self.acr.is_empty()
            && !step_up
                .acr
                .as_ref()
                .is_some_and(|acr| self.acr.iter().any(|a| a == acr))
        {
            return Some(format!(
                "the caller token's acr must be one of {}",
                quoted(&self.acr)
            ));
        }
        if !self.amr.is_empty() && !step_up.amr.iter().any(|m| self.amr.contains(m)) {
            return Some(format!(
                "the caller token's amr must hold one of {}",
                quoted(&self.amr)
            ));
        }
        let max_age = self.max_age_seconds;
        let fresh = step_up.auth_time.is_some_and(|at| {
            at <= now.saturating_add(60) && now.saturating_sub(at) <= max_age as i64
        });
        if !fresh {
            return Some(format!(
                "the caller token's auth_time must be within the last {max_age} seconds"
            ));
        }
        None
    }
}

fn quoted(values: &[String]) -> String {
    values
        .iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One grant, compiled.
#[derive(Debug)]
struct Grant {
    /// `grants[i]`, or `grants[i] ("name")`.
    label: String,
    every_tool: bool,
    tools: BTreeSet<String>,
}

/// A loaded, validated policy. Every answer is from memory.
#[derive(Debug)]
pub struct Policy {
    grants: Vec<Grant>,
    /// Exact agent ids → the grants naming them.
    exact: HashMap<String, Vec<usize>>,
    /// Glob patterns, and for each the grant it belongs to.
    globs: GlobSet,
    glob_grant: Vec<usize>,
    tools: HashMap<String, ToolRule>,
    approval: Option<Approval>,
}

/// A policy file that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

impl Policy {
    /// Parses and validates a policy file's text. `previous` lends its rate-limit state to the
    /// tools whose limits did not change, so a reload does not refill every bucket.
    pub fn parse(
        text: &str,
        secrets_ttl_seconds: u64,
        previous: Option<&Self>,
    ) -> Result<Self, Invalid> {
        use figment::providers::{Format, Toml};
        let file: File = figment::Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| Invalid(e.into_iter().map(|e| e.to_string()).collect()))?;
        Self::compile(file, secrets_ttl_seconds, previous)
    }

    fn compile(
        file: File,
        secrets_ttl_seconds: u64,
        previous: Option<&Self>,
    ) -> Result<Self, Invalid> {
        let mut problems = Vec::new();
        if file.grants.len() > MAX_ENTRIES || file.tools.len() > MAX_ENTRIES {
            return Err(Invalid(vec![format!(
                "at most {MAX_ENTRIES} grants and {MAX_ENTRIES} tools"
            )]));
        }
        let mut grants = Vec::with_capacity(file.grants.len());
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut globs = GlobSetBuilder::new();
        let mut glob_grant = Vec::new();
        for (i, entry) in file.grants.into_iter().enumerate() {
            let label = match &entry.name {
                Some(name) => format!("grants[{i}] ({name:?})"),
                None => format!("grants[{i}]"),
            };
            if entry.agents.is_empty() {
                problems.push(format!("{label}: agents must name at least one agent"));
            }
            if entry.agents.len() > MAX_ENTRIES || entry.tools.len() > MAX_ENTRIES {
                problems.push(format!("{label}: too many agents or tools"));
                continue;
            }
            for pattern in entry.agents {
                if pattern.is_empty()
                    || pattern.len() > 256
                    || pattern.chars().any(char::is_control)
                {
                    problems.push(format!(
                        "{label}: agent pattern {pattern:?} must be 1..256 characters without control characters"
                    ));
                } else if !pattern.contains(['*', '?', '[', '{']) {
                    exact.entry(pattern).or_default().push(i);
                } else {
                    match Glob::new(&pattern) {
                        Ok(glob) => {
                            globs.add(glob);
                            glob_grant.push(i);
                        }
                        Err(e) => problems.push(format!("{label}: agent pattern {pattern:?}: {e}")),
                    }
                }
            }
            let every_tool = entry.tools.iter().any(|t| t == "*");
            let mut tools = BTreeSet::new();
            for tool in entry.tools {
                if tool == "*" {
                    continue;
                }
                match Tool::parse(tool.clone()) {
                    Ok(_) => {
                        tools.insert(tool);
                    }
                    Err(e) => problems.push(format!("{label}: tool {tool:?} {}", e.0)),
                }
            }
            grants.push(Grant {
                label,
                every_tool,
                tools,
            });
        }
        // A step-up is an authentication within `max_age_seconds` (so a token minted from an
        // old login proves nothing), optionally of a kind (`acr`, `amr`).
        let has_approval = file.approval.is_some();
        let approval = file.approval.and_then(|entry| match entry.max_age_seconds {
            Some(max_age_seconds @ 1..) => Some(Approval {
                acr: entry.acr,
                amr: entry.amr,
                max_age_seconds,
            }),
            _ => {
                problems.push(
                    "approval.max_age_seconds: say how recent a step-up must be (1 or more seconds; \
                     the caller token's auth_time is checked against it)"
                        .to_string(),
                );
                None
            }
        });
        let mut tools = HashMap::new();
        for (name, entry) in file.tools {
            let rule = format!("tools.{name}");
            if let Err(e) = Tool::parse(name.clone()) {
                problems.push(format!("{rule}: not a tool name: {}", e.0));
                continue;
            }
            if let Some(ttl) = entry.max_ttl_seconds
                && !(1..=secrets_ttl_seconds).contains(&ttl)
            {
                problems.push(format!(
                    "{rule}.max_ttl_seconds: must be between 1 and SECRETS_TTL_SECONDS ({secrets_ttl_seconds}), got {ttl}"
                ));
            }
            if let Some(scopes) = &entry.scopes
                && scopes
                    .iter()
                    .any(|s| s.is_empty() || s.len() > 512 || s.chars().any(char::is_whitespace))
            {
                problems.push(format!(
                    "{rule}.scopes: each scope must be 1..512 bytes without spaces"
                ));
            }
            if entry.approval == ApprovalMode::Required && !has_approval {
                problems.push(format!(
                    "{rule}.approval: \"required\" needs an [approval] section saying what a step-up is"
                ));
            }
            let mut quota = |which: &str, q: Option<QuotaEntry>| {
                q.and_then(|q| match Quota::new(q.per_second, q.burst) {
                    Ok(quota) => Some(quota),
                    Err(problem) => {
                        problems.push(format!("{rule}.limits.{which}: {problem}"));
                        None
                    }
                })
            };
            let agent = quota("agent", entry.limits.agent);
            let user = quota("user", entry.limits.user);
            let limits = previous
                .and_then(|p| p.tools.get(&name))
                .map(|old| Arc::clone(&old.limits))
                .filter(|old| old.quotas() == (agent, user))
                .unwrap_or_else(|| Arc::new(Limits::new(agent, user)));
            tools.insert(
                name,
                ToolRule {
                    scopes: entry.scopes.map(|s| s.into_iter().collect()),
                    max_ttl_seconds: entry.max_ttl_seconds,
                    approval: entry.approval == ApprovalMode::Required,
                    limits,
                },
            );
        }
        let globs = globs
            .build()
            .map_err(|e| Invalid(vec![format!("grants: {e}")]))?;
        if !problems.is_empty() {
            return Err(Invalid(problems));
        }
        Ok(Self {
            grants,
            exact,
            globs,
            glob_grant,
            tools,
            approval,
        })
    }

    /// Whether `agent` may use `tool` at all.
    pub fn check_use(&self, agent: &AgentId, tool: &Tool) -> Result<(), Denied> {
        let agent = agent.as_str();
        let mut matching = Vec::new();
        let exact = self.exact.get(agent).map(Vec::as_slice).unwrap_or_default();
        let globbed = self.globs.matches(agent);
        for &i in exact
            .iter()
            .chain(globbed.iter().map(|&g| &self.glob_grant[g]))
        {
            let grant = &self.grants[i];
            if grant.every_tool || grant.tools.contains(tool.as_str()) {
                return Ok(());
            }
            matching.push(grant.label.as_str());
        }
        let message = if matching.is_empty() {
            format!("the policy grants agent {agent:?} no tools: no grant matches it")
        } else {
            matching.sort_unstable();
            matching.dedup();
            format!(
                "the policy does not let agent {agent:?} use tool {tool}: no grant matching it ({}) names the tool",
                matching.join(", ")
            )
        };
        Err(Denied {
            rule: "grants".into(),
            message,
        })
    }

    /// Whether `caller` proved a step-up recently enough for `tool` (at `now`, unix seconds).
    pub fn check_step_up(&self, caller: &Caller, tool: &Tool, now: i64) -> Result<(), Denied> {
        if !self
            .tools
            .get(tool.as_str())
            .is_some_and(|rule| rule.approval)
        {
            return Ok(());
        }
        // Validation makes sure a tool requiring approval has the section; without one,
        // nothing is a step-up.
        let unmet = match &self.approval {
            Some(approval) => approval.unmet(&caller.step_up, now),
            None => Some("the policy does not say what a step-up is".to_string()),
        };
        match unmet {
            None => Ok(()),
            Some(unmet) => Err(Denied {
                rule: format!("tools.{tool}.approval"),
                message: format!("tool {tool} requires a recent step-up: {unmet}"),
            }),
        }
    }

    /// Whether `scopes` stay within `tool`'s ceiling.
    pub fn check_scopes(&self, tool: &Tool, scopes: &[String]) -> Result<(), OverCeiling> {
        let Some(ceiling) = self
            .tools
            .get(tool.as_str())
            .and_then(|rule| rule.scopes.as_ref())
        else {
            return Ok(());
        };
        let over: Vec<&str> = scopes
            .iter()
            .filter(|s| !ceiling.contains(s.as_str()))
            .map(String::as_str)
            .collect();
        if over.is_empty() {
            return Ok(());
        }
        let allowed: Vec<&str> = ceiling.iter().map(String::as_str).collect();
        Err(OverCeiling {
            rule: format!("tools.{tool}.scopes"),
            problem: format!(
                "{} over the ceiling of tools.{tool}.scopes in the policy (allowed: {})",
                over.join(" "),
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(" ")
                }
            ),
        })
    }

    /// `tool`'s TTL maximum, when the policy sets one.
    pub fn max_ttl(&self, tool: &Tool) -> Option<u64> {
        self.tools.get(tool.as_str())?.max_ttl_seconds
    }

    /// `tool`'s own rate limits, when the policy sets any.
    pub fn limits(&self, tool: &Tool) -> Option<&Arc<Limits>> {
        self.tools.get(tool.as_str()).map(|rule| &rule.limits)
    }

    /// Every tool's limits, for the periodic clean-up of idle buckets.
    pub(crate) fn all_limits(&self) -> impl Iterator<Item = &Arc<Limits>> {
        self.tools.values().map(|rule| &rule.limits)
    }

    /// How many grants and tool rules it holds, for the log line of a load.
    pub fn size(&self) -> (usize, usize) {
        (self.grants.len(), self.tools.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{IssuerId, UserId};

    fn caller(agent: &str) -> Caller {
        Caller {
            issuer: IssuerId::parse("https://issuer.test").unwrap(),
            agent: AgentId::parse(agent).unwrap(),
            user: UserId::parse("u").unwrap(),
            admin: false,
            store: false,
            jti: None,
            step_up: StepUp::default(),
        }
    }

    fn tool(name: &str) -> Tool {
        Tool::parse(name).unwrap()
    }

    fn agent(name: &str) -> AgentId {
        AgentId::parse(name).unwrap()
    }

    const FILE: &str = r#"
        [[grants]]
        name = "support"
        agents = ["support-*", "helpdesk"]
        tools = ["jira"]

        [[grants]]
        agents = ["helpdesk"]
        tools = ["confluence"]

        [[grants]]
        agents = ["root-agent"]
        tools = ["*"]

        [tools.stripe]
        scopes = ["read_only", "charges:read"]
        max_ttl_seconds = 3600
        approval = "required"
        limits.user = { per_second = 0.5, burst = 2 }

        [approval]
        acr = ["mfa"]
        max_age_seconds = 300
    "#;

    #[test]
    fn grants_are_the_union_of_every_matching_rule_by_exact_id_or_glob() {
        let policy = Policy::parse(FILE, 86_400, None).unwrap();
        assert!(policy.check_use(&agent("support-7"), &tool("jira")).is_ok());
        assert!(policy.check_use(&agent("helpdesk"), &tool("jira")).is_ok());
        assert!(
            policy
                .check_use(&agent("helpdesk"), &tool("confluence"))
                .is_ok()
        );
        assert!(
            policy
                .check_use(&agent("root-agent"), &tool("anything"))
                .is_ok()
        );
        let denied = policy
            .check_use(&agent("support-7"), &tool("confluence"))
            .unwrap_err();
        assert_eq!(denied.rule, "grants");
        assert!(
            denied.message.contains("grants[0] (\"support\")"),
            "{}",
            denied.message
        );
        let nobody = policy
            .check_use(&agent("billing"), &tool("jira"))
            .unwrap_err();
        assert!(
            nobody.message.contains("no grant matches"),
            "{}",
            nobody.message
        );
    }

    #[test]
    fn scopes_over_the_ceiling_are_named_and_the_ttl_maximum_is_the_tools() {
        let policy = Policy::parse(FILE, 86_400, None).unwrap();
        assert!(
            policy
                .check_scopes(&tool("stripe"), &["read_only".into()])
                .is_ok()
        );
        assert!(
            policy
                .check_scopes(&tool("jira"), &["anything".into()])
                .is_ok()
        );
        let over = policy
            .check_scopes(&tool("stripe"), &["read_only".into(), "write".into()])
            .unwrap_err();
        assert_eq!(over.rule, "tools.stripe.scopes");
        assert!(
            over.problem.starts_with("write over the ceiling"),
            "{}",
            over.problem
        );
        assert_eq!(policy.max_ttl(&tool("stripe")), Some(3600));
        assert_eq!(policy.max_ttl(&tool("jira")), None);
    }

    #[test]
    fn a_step_up_needs_every_configured_claim_and_a_recent_auth_time() {
        let policy = Policy::parse(FILE, 86_400, None).unwrap();
        let now = 1_000_000;
        let mut stepped = caller("root-agent");
        assert!(
            policy.check_step_up(&stepped, &tool("jira"), now).is_ok(),
            "no approval needed"
        );
        let denied = policy
            .check_step_up(&stepped, &tool("stripe"), now)
            .unwrap_err();
        assert_eq!(denied.rule, "tools.stripe.approval");
        stepped.step_up.acr = Some("mfa".into());
        assert!(
            policy
                .check_step_up(&stepped, &tool("stripe"), now)
                .is_err(),
            "auth_time missing"
        );
        stepped.step_up.auth_time = Some(now - 301);
        assert!(
            policy
                .check_step_up(&stepped, &tool("stripe"), now)
                .is_err(),
            "too old"
        );
        stepped.step_up.auth_time = Some(now - 299);
        assert!(policy.check_step_up(&stepped, &tool("stripe"), now).is_ok());
        stepped.step_up.acr = Some("pwd".into());
        assert!(
            policy
                .check_step_up(&stepped, &tool("stripe"), now)
                .is_err(),
            "wrong acr"
        );
    }

    #[test]
    fn validation_reports_every_problem_naming_its_rule() {
        let bad = r#"
            [[grants]]
            agents = []
            tools = ["not a tool"]

            [tools.stripe]
            max_ttl_seconds = 999999999
            approval = "required"
            limits.agent = { per_second = 0 }
        "#;
        let Invalid(problems) = Policy::parse(bad, 86_400, None).unwrap_err();
        let text = problems.join("\n");
        for expected in [
            "grants[0]: agents must name at least one agent",
            "grants[0]: tool \"not a tool\"",
            "tools.stripe.max_ttl_seconds",
            "tools.stripe.approval",
            "tools.stripe.limits.agent",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
        // A step-up that is not bounded in time proves nothing about now.
        let Invalid(problems) = Policy::parse(
            "[approval]\nacr = [\"mfa\"]\n[tools.stripe]\napproval = \"required\"",
            86_400,
            None,
        )
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("approval.max_age_seconds"),
            "{problems:?}"
        );
        assert!(Policy::parse("[approval]\nmax_age_seconds = 0", 86_400, None).is_err());
        let unknown =
            Policy::parse("[[grants]]\nagent = [\"a\"]\ntools = []", 86_400, None).unwrap_err();
        assert!(unknown.to_string().contains("agent"), "{unknown}");
        assert!(Policy::parse("this is not toml =", 86_400, None).is_err());
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_tools_whose_limits_did_not_change() {
        let first = Policy::parse(FILE, 86_400, None).unwrap();
        let same = Policy::parse(FILE, 86_400, Some(&first)).unwrap();
        assert!(Arc::ptr_eq(
            first.limits(&tool("stripe")).unwrap(),
            same.limits(&tool("stripe")).unwrap()
        ));
        let changed = FILE.replace("per_second = 0.5", "per_second = 2");
        let other = Policy::parse(&changed, 86_400, Some(&first)).unwrap();
        assert!(!Arc::ptr_eq(
            first.limits(&tool("stripe")).unwrap(),
            other.limits(&tool("stripe")).unwrap()
        ));
    }

    #[test]
    fn a_thousand_agent_policy_answers_from_memory() {
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!(
                "[[grants]]\nagents = [\"agent-{i}\"]\ntools = [\"jira\"]\n"
            ));
        }
        text.push_str("[[grants]]\nagents = [\"team-*-bot\"]\ntools = [\"jira\"]\n");
        let policy = Policy::parse(&text, 86_400, None).unwrap();
        assert_eq!(policy.size(), (1001, 0));
        assert!(policy.check_use(&agent("agent-999"), &tool("jira")).is_ok());
        assert!(
            policy
                .check_use(&agent("team-x-bot"), &tool("jira"))
                .is_ok()
        );
        assert!(
            policy
                .check_use(&agent("agent-1000"), &tool("jira"))
                .is_err()
        );
    }
}
