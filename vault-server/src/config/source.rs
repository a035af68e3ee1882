//! Where settings come from: the TOML file named by `VAULT_CONFIG`, the environment over it, and
//! explicit pairs over both (tests, and `dev` replacing keys with its own). A name that looks like
//! a setting but is none stops startup naming the closest real one: a mistyped name must not
//! silently leave its default in force.

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};

use super::{Config, ConfigError, Problems};

/// `VAULT_*` variables that are not settings: the file's own pointer, and what `vault-client`'s
/// examples and the `dev` banner's commands read, which share a shell with the server.
const NOT_SETTINGS: &[&str] = &[
    "VAULT_CONFIG",
    "VAULT_ADDR",
    "VAULT_TOKEN",
    "VAULT_TOKEN_FILE",
];

/// Where a value was set, for the message about a name that is not a setting.
#[derive(Debug, Clone, Copy)]
enum Origin {
    File,
    Environment,
    Given,
}

/// Setting values by lower-cased name, later sources over earlier ones. They include secrets,
/// so `Debug` shows none of them.
#[derive(Clone, Default)]
pub struct Source {
    values: BTreeMap<String, (Origin, Value)>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Source([redacted])")
    }
}

impl Source {
    /// The process environment, over `VAULT_CONFIG`'s TOML file when that is set.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut source = Self::default();
        if let Ok(path) = std::env::var("VAULT_CONFIG") {
            source.add_file(&path)?;
        }
        source.add_env(Env::raw().iter().map(|(key, text)| (key.to_string(), text)));
        Ok(source)
    }

    /// Adds a TOML file's settings; its keys are the settings' names in either case.
    fn add_file(&mut self, path: &str) -> Result<(), ConfigError> {
        let problem = |p: String| ConfigError::new("VAULT_CONFIG", p);
        if !Path::new(path).is_file() {
            return Err(problem(format!("no such file: {path}")));
        }
        let file: Dict = Figment::from(Toml::file(path))
            .extract()
            .map_err(|e| problem(e.to_string()))?;
        for (key, value) in file {
            self.set(&key, Origin::File, value);
        }
        Ok(())
    }

    /// Adds the environment variables that are settings, or look like one.
    fn add_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        let names = Config::default().describe();
        for (key, text) in vars {
            let setting = names.iter().any(|s| s.name.eq_ignore_ascii_case(&key));
            let other = NOT_SETTINGS.iter().any(|n| n.eq_ignore_ascii_case(&key));
            if setting || (key.to_ascii_lowercase().starts_with("vault_") && !other) {
                // Typed as figment types the environment, so a value means what it always has.
                let value = text.parse().unwrap_or_else(|never| match never {});
                self.set(&key, Origin::Environment, value);
            }
        }
    }

    /// These pairs win over everything already in the source.
    pub fn with_overrides<'a>(
        mut self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        for (key, value) in pairs {
            self.set(key, Origin::Given, Value::from(value.to_string()));
        }
        self
    }

    /// Whether `name` was given a non-empty value by any source.
    pub fn is_set(&self, name: &str) -> bool {
        self.values
            .get(&name.to_ascii_lowercase())
            .is_some_and(|(_, value)| value.as_str().is_none_or(|text| !text.trim().is_empty()))
    }

    /// Explicit pairs, for tests and embedding: `[("VAULT_LISTEN", "127.0.0.1:0"), ...]`.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self::default().with_overrides(pairs)
    }

    fn set(&mut self, key: &str, origin: Origin, value: Value) {
        self.values
            .insert(key.to_ascii_lowercase(), (origin, value));
    }

    /// Every setting read from its value, or its default. Fails on a name that is not a
    /// setting; a value that cannot be read is left at its default and returned as a problem,
    /// so that validation can report the rest too.
    pub fn read(&self) -> Result<(Config, Vec<ConfigError>), Problems> {
        let settings = Config::default().describe();
        let mut values = Dict::new();
        let mut unknown = Vec::new();
        for (key, (origin, value)) in &self.values {
            let Some(setting) = settings.iter().find(|s| s.name.eq_ignore_ascii_case(key)) else {
                unknown.push(not_a_setting(key, *origin, &settings));
                continue;
            };
            let empty = value.as_str().is_some_and(|text| text.trim().is_empty());
            if !(empty && setting.empty_is_unset) {
                values.insert(key.clone(), value.clone());
            }
        }
        if !unknown.is_empty() {
            return Err(Problems(unknown));
        }
        let mut problems = Vec::new();
        loop {
            let error = match Figment::from(Serialized::defaults(&values)).extract::<Config>() {
                Ok(config) => return Ok((config, problems)),
                Err(error) => error,
            };
            // Each error names one value; drop it and read again, to find every bad value.
            match error.path.first().and_then(|key| values.remove_entry(key)) {
                Some((key, _)) => {
                    let name = key.to_ascii_uppercase();
                    let mut problem = error.kind.to_string();
                    let accepts = settings.iter().find(|s| s.name == name).map(|s| &s.accepts);
                    if let Some(range @ super::Accepts::Range(_)) = accepts {
                        problem.push_str(&format!(" (accepts {range})"));
                    }
                    problems.push(ConfigError::new(name, problem));
                }
                None => {
                    problems.push(ConfigError::new("VAULT_CONFIG", error.to_string()));
                    return Err(Problems(problems));
                }
            }
        }
    }
}

fn not_a_setting(key: &str, origin: Origin, settings: &[super::Described]) -> ConfigError {
    let name = key.to_ascii_uppercase();
    let closest = settings
        .iter()
        // Jaro-Winkler weighs a shared beginning, so a name cut short finds its full form.
        .max_by(|a, b| {
            let score = |s: &super::Described| strsim::jaro_winkler(&name, &s.name);
            score(a).total_cmp(&score(b))
        })
        .map_or("", |s| s.name.as_str());
    let place = match origin {
        Origin::File => "in VAULT_CONFIG",
        Origin::Environment => "in the environment",
        Origin::Given => "given",
    };
    ConfigError::new(
        name.clone(),
        format!("is not a setting ({place}); did you mean {closest}?"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Source {
        let mut source = Source::default();
        source.add_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        source
    }

    #[test]
    fn an_unknown_vault_variable_stops_startup_naming_the_closest_setting() {
        let err = env(&[("VAULT_LISTN", "127.0.0.1:1"), ("VAULT_SWEEP_BACH", "5")])
            .read()
            .unwrap_err();
        assert_eq!(err.names(), ["VAULT_LISTN", "VAULT_SWEEP_BACH"]);
        assert!(
            err.0[0].problem.contains("did you mean VAULT_LISTEN?"),
            "{err}"
        );
        assert!(
            err.0[1].problem.contains("did you mean VAULT_SWEEP_BATCH?"),
            "{err}"
        );
    }

    #[test]
    fn variables_other_tools_read_are_not_taken_for_settings() {
        let source = env(&[
            ("VAULT_TOKEN", "eyJ..."),
            ("VAULT_ADDR", "http://127.0.0.1:50051"),
            ("VAULT_TOKEN_FILE", "/tmp/token"),
            ("VAULT_CONFIG", "/tmp/vault.toml"),
            ("PATH", "/bin"),
            ("vault_sweep_batch", "5"),
        ]);
        let (config, problems) = source.read().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.vault_sweep_batch, 5, "names are matched in any case");
    }

    #[test]
    fn an_unknown_key_in_the_file_stops_startup_naming_the_closest_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.toml");
        std::fs::write(&path, "VAULT_SWEEP_BATCH = 7\nvault_jwt_issuers = \"x\"\n").unwrap();
        let mut source = Source::default();
        source.add_file(path.to_str().unwrap()).unwrap();
        let err = source.read().unwrap_err();
        assert_eq!(err.names(), ["VAULT_JWT_ISSUERS"]);
        assert!(err.0[0].problem.contains("in VAULT_CONFIG"), "{err}");
        assert!(
            err.0[0].problem.contains("did you mean VAULT_JWT_ISSUER?"),
            "{err}"
        );
    }

    #[test]
    fn the_environment_wins_over_the_file_and_typed_values_read_like_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.toml");
        let file = "VAULT_SWEEP_BATCH = 7\nVAULT_ALLOW_PLAINTEXT = true\nVAULT_JWT_AUDIENCE = 42\n";
        std::fs::write(&path, file).unwrap();
        let mut source = Source::default();
        source.add_file(path.to_str().unwrap()).unwrap();
        source.add_env([("VAULT_SWEEP_BATCH".to_string(), "9".to_string())]);
        let (config, problems) = source.read().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.vault_sweep_batch, 9);
        assert!(config.vault_allow_plaintext);
        assert_eq!(config.vault_jwt_audience, "42");
    }

    #[test]
    fn every_unreadable_value_is_reported_and_left_at_its_default() {
        let source = Source::from_pairs([
            ("VAULT_SWEEP_BATCH", "many"),
            ("VAULT_ALLOW_PLAINTEXT", "perhaps"),
            ("VAULT_JWT_AUDIENCE", ""),
        ]);
        let (config, problems) = source.read().unwrap();
        let names: Vec<&str> = problems.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["VAULT_ALLOW_PLAINTEXT", "VAULT_SWEEP_BATCH"]);
        assert_eq!(
            problems[1].problem,
            "must be a whole number, got \"many\" (accepts 1 to 100000)"
        );
        assert_eq!(config.vault_sweep_batch, 1000);
        assert_eq!(
            config.vault_jwt_audience, "credential-vault",
            "empty means unset"
        );
    }
}
