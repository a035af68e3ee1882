//! Chaos and load (issue 16): the vault under a database restart, a hung provider and overload,
//! each scenario asserting what must hold and printing what it measured.
//!
//! The README's test command runs the short form. `VAULT_CHAOS_LONG=1` runs the long form,
//! whose figures the README reports:
//!
//! ```sh
//! VAULT_CHAOS_LONG=1 cargo test -p vault-server --test blackbox chaos -- --nocapture --test-threads=1
//! ```
//!
//! Every scenario talks only to loopback: its own PostgreSQL (a private cluster on a Unix
//! socket, so restarting it disturbs no other test), in-process vaults and a hung provider.

mod lease;
mod load;
mod overload;
mod postgres;
mod provider;
mod replicas;
mod soak;

/// Whether the long form was asked for.
pub fn long() -> bool {
    std::env::var_os("VAULT_CHAOS_LONG").is_some_and(|v| v != "0" && !v.is_empty())
}

/// `short` in the README's test run, `long` with `VAULT_CHAOS_LONG=1`.
pub fn pick<T>(short: T, long_form: T) -> T {
    if long() { long_form } else { short }
}

/// Prints one scenario's figures, one `name: value` per line, under its title.
pub fn report(scenario: &str, figures: &[(&str, String)]) {
    let mut text = format!(
        "chaos [{}] {scenario}\n",
        if long() { "long" } else { "short" }
    );
    for (name, value) in figures {
        text.push_str(&format!("  {name}: {value}\n"));
    }
    // Through the test harness's capture: shown with --nocapture, or when the test fails.
    println!("{text}");
}
