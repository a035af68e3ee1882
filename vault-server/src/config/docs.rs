//! What `vault-server config` prints: the effective settings with secrets redacted, and with
//! `--docs` the reference table of every setting, which the README carries verbatim.

use super::Config;

/// Every setting with its default, accepted values and meaning, as a markdown table.
pub fn docs_table() -> String {
    let mut out = String::from("| setting | default | accepts | meaning |\n|---|---|---|---|\n");
    for setting in Config::default().describe() {
        let default = match setting.value.as_str() {
            "" => "—".to_string(),
            value => format!("`{value}`"),
        };
        let cell = |text: &str| text.replace('|', "\\|");
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            setting.name,
            cell(&default),
            cell(&setting.accepts.to_string()),
            cell(&setting.doc),
        ));
    }
    out
}

/// The settings in force, one `NAME = "value"` line each (a valid `VAULT_CONFIG` file but for
/// redacted secrets); settings left unset are listed as comments.
pub fn effective(config: &Config) -> String {
    let mut out = String::new();
    for setting in config.describe() {
        if setting.value.is_empty() {
            out.push_str(&format!("# {} is not set\n", setting.name));
        } else {
            out.push_str(&format!("{} = {:?}\n", setting.name, setting.value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's settings table: the lines of the table that starts with the docs' header.
    fn readme_table() -> String {
        let readme = include_str!("../../../README.md");
        let header = docs_table().lines().next().unwrap_or_default().to_string();
        let table = readme
            .lines()
            .skip_while(|line| *line != header)
            .take_while(|line| line.starts_with('|'));
        table.map(|line| format!("{line}\n")).collect()
    }

    #[test]
    fn the_readme_settings_table_is_the_docs_output() {
        assert_eq!(
            readme_table(),
            docs_table(),
            "README.md's settings table differs from `vault-server config --docs`; paste its output"
        );
    }

    #[test]
    fn every_setting_is_documented_with_its_default() {
        let table = docs_table();
        assert!(table.contains("| `VAULT_LISTEN` | `127.0.0.1:50051` | host:port |"));
        assert!(table.contains("| `SECRETS_TTL_SECONDS` | `2592000` | 1 to 2592000 |"));
        assert!(table.contains("| `VAULT_ROOT_KEY` | — |"));
        for line in table.lines().skip(2) {
            assert!(
                !line.ends_with("|  |"),
                "a setting without a doc comment: {line}"
            );
        }
    }

    #[test]
    fn the_effective_configuration_redacts_secrets() {
        let config = crate::config::Source::from_pairs([
            ("VAULT_ROOT_PASSPHRASE", "correct horse battery staple"),
            (
                "VAULT_DATABASE_URL",
                "postgres://vault:pw-123@db.internal/vault",
            ),
            ("VAULT_SWEEP_BATCH", "77"),
        ])
        .read()
        .unwrap()
        .0;
        let shown = effective(&config);
        assert!(shown.contains("VAULT_SWEEP_BATCH = \"77\""), "{shown}");
        assert!(
            shown.contains("VAULT_ROOT_PASSPHRASE = \"[redacted]\""),
            "{shown}"
        );
        assert!(shown.contains("# VAULT_ROOT_KEY is not set"), "{shown}");
        assert!(
            !shown.contains("correct horse") && !shown.contains("pw-123"),
            "{shown}"
        );
    }
}
