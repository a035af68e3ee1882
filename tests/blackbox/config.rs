//! The settings as an operator meets them: a mistyped name, in the environment or in the
//! `VAULT_CONFIG` file, stops the real binary before it touches anything, naming the setting
//! that was meant; `vault-server config` shows what is in force without showing secrets.

use crate::helpers::run_binary_to_exit;

#[test]
fn a_mistyped_variable_stops_startup_naming_the_setting_meant() {
    let (ok, stderr) = run_binary_to_exit(
        &["serve"],
        &[
            ("VAULT_LISTN", "127.0.0.1:0"),
            ("VAULT_TOKEN", "not a setting"),
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("VAULT_LISTN") && stderr.contains("did you mean VAULT_LISTEN?"),
        "{stderr}"
    );
    assert!(!stderr.contains("VAULT_TOKEN"), "{stderr}");
}

#[test]
fn a_mistyped_file_key_stops_startup_naming_the_setting_meant() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vault.toml");
    std::fs::write(&file, "VAULT_SWEEP_INTERVAL = 60\n").unwrap();
    let (ok, stderr) =
        run_binary_to_exit(&["migrate"], &[("VAULT_CONFIG", file.to_str().unwrap())]);
    assert!(!ok);
    assert!(
        stderr.contains("VAULT_SWEEP_INTERVAL: is not a setting (in VAULT_CONFIG)")
            && stderr.contains("did you mean VAULT_SWEEP_INTERVAL_SECONDS?"),
        "{stderr}"
    );
}

#[test]
fn config_prints_the_settings_in_force_with_secrets_redacted() {
    let passphrase = "correct horse battery staple";
    let (ok, stderr) = run_binary_to_exit(
        &["config"],
        &[
            ("VAULT_ROOT_PASSPHRASE", passphrase),
            ("VAULT_SWEEP_BATCH", "0"),
        ],
    );
    assert!(!ok, "the problems make it fail");
    assert!(!stderr.contains(passphrase), "{stderr}");
    assert!(
        stderr.contains("VAULT_SWEEP_BATCH: must be between 1 and 100000, got 0")
            && stderr.contains("VAULT_JWT_ISSUER: is not set"),
        "every problem at once: {stderr}"
    );
}
