//! Limits on the calls an attacker without an account uses: sign-ups per source address,
//! and failed logins per source address, per (account, address) and per account.
//!
//! These are process-wide (one table behind a mutex for each limit), unlike the per-user
//! rate limiter, which is per shard: a connection lands on any shard, and a per-shard
//! budget would multiply an attacker's guesses by the shard count. Sign-ups and logins
//! hash a password for tens of milliseconds each, so a short critical section here costs
//! nothing next to the work it guards.
//!
//! The login limits count failures only: each attempt takes a token from all three buckets
//! before the password is checked, and a successful login gives them back. Why three:
//!
//! - per (account, address): guessing one account's password from one place; small.
//! - per address: spraying many accounts from one place; larger.
//! - per account, over all addresses: a distributed attack on one account; the largest,
//!   a ceiling. Only this one can lock an account's owner out, and only an attacker with
//!   many addresses can reach it, because each address's share is capped by the first.
//!   The owner's own attempts from their usual address keep their own (account, address)
//!   budget, so a single-address attacker never locks them out.
//!
//! A refused attempt is answered 429 with `Retry-After` before any password is hashed.
//!
//! In a cluster each node keeps its own tables, and a node that refuses a password tells
//! every other node (a notice: `crate::api::forward`), which counts the failure too
//! ([`AuthGuard::failed_elsewhere`]); best effort, so a notice lost with a link costs one
//! uncounted failure.

use crate::config::Config;
use crate::error::ApiError;
use crate::ratelimit::Limiter;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SECONDS_PER_HOUR: f64 = 3600.0;

/// The sign-up and login limits of one server.
pub struct AuthGuard {
    signup_ip: Mutex<Limiter>,
    login_ip: Mutex<Limiter>,
    login_account_ip: Mutex<Limiter>,
    login_account: Mutex<Limiter>,
    /// Keys are hashed with a per-process random seed, so that nobody can choose inputs
    /// that collide with someone else's bucket.
    hasher: std::collections::hash_map::RandomState,
}

fn limiter(per_hour: f64, burst: f64) -> Mutex<Limiter> {
    Mutex::new(Limiter::new(per_hour / SECONDS_PER_HOUR, burst))
}

/// The buckets a login attempt took; [`AuthGuard::login_succeeded`] gives them back.
#[derive(Debug, Clone, Copy)]
pub struct LoginAttempt {
    ip: u64,
    account_ip: u64,
    account: u64,
}

impl AuthGuard {
    /// The limits the configuration names.
    pub fn new(config: &Config) -> AuthGuard {
        AuthGuard {
            signup_ip: limiter(config.signup_per_ip_per_hour, config.signup_per_ip_burst),
            login_ip: limiter(
                config.login_failures_per_ip_per_hour,
                config.login_failures_per_ip_burst,
            ),
            login_account_ip: limiter(
                config.login_failures_per_account_ip_per_hour,
                config.login_failures_per_account_ip_burst,
            ),
            login_account: limiter(
                config.login_failures_per_account_per_hour,
                config.login_failures_per_account_burst,
            ),
            hasher: Default::default(),
        }
    }

    fn key(&self, value: impl Hash) -> u64 {
        self.hasher.hash_one(value)
    }

    /// Takes one sign-up from the address's budget.
    pub fn signup(&self, ip: IpAddr) -> Result<(), ApiError> {
        take(&self.signup_ip, self.key(ip), Instant::now())
            .map_err(|after| limited(after, "too many sign-ups from this address"))
    }

    /// Takes one failure from each of the login budgets of `email` from `ip`, before the
    /// password is checked; refused if any is spent (and then none is taken).
    pub fn login(&self, email: &str, ip: IpAddr) -> Result<LoginAttempt, ApiError> {
        let account = normalise_email(email);
        let attempt = LoginAttempt {
            ip: self.key(ip),
            account_ip: self.key((&account, ip)),
            account: self.key(&account),
        };
        let now = Instant::now();
        let buckets = [
            (&self.login_account_ip, attempt.account_ip),
            (&self.login_ip, attempt.ip),
            (&self.login_account, attempt.account),
        ];
        for (i, (limiter, key)) in buckets.iter().enumerate() {
            if let Err(after) = take(limiter, *key, now) {
                // Give back what the earlier buckets took: a refused attempt costs nothing.
                for (limiter, key) in &buckets[..i] {
                    lock(limiter).give_back(*key);
                }
                return Err(limited(after, "too many failed logins; try again later"));
            }
        }
        Ok(attempt)
    }

    /// Another node of the cluster refused a login of `email` from `ip`: the failure
    /// counts here too (one token from each budget, as far as any is left), so that an
    /// attacker who spreads guesses over the nodes has no more than against one.
    pub fn failed_elsewhere(&self, email: &str, ip: IpAddr) {
        let account = normalise_email(email);
        let now = Instant::now();
        for (limiter, key) in [
            (&self.login_account_ip, self.key((&account, ip))),
            (&self.login_ip, self.key(ip)),
            (&self.login_account, self.key(&account)),
        ] {
            // An empty bucket stays empty: the failure is counted either way.
            let _ = take(limiter, key, now);
        }
    }

    /// The attempt succeeded: it was not a failure, so its tokens go back.
    pub fn login_succeeded(&self, attempt: LoginAttempt) {
        lock(&self.login_account_ip).give_back(attempt.account_ip);
        lock(&self.login_ip).give_back(attempt.ip);
        lock(&self.login_account).give_back(attempt.account);
    }
}

fn lock(limiter: &Mutex<Limiter>) -> std::sync::MutexGuard<'_, Limiter> {
    // A panic while holding the lock cannot leave a limiter inconsistent in a way that
    // matters more than refusing every login would.
    limiter
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn take(limiter: &Mutex<Limiter>, key: u64, now: Instant) -> Result<(), Duration> {
    lock(limiter).try_take(key, now)
}

fn limited(after: Duration, message: &str) -> ApiError {
    ApiError {
        message: message.to_owned(),
        ..ApiError::rate_limited(after)
    }
}

/// The account an email names for the limits: case and surrounding space do not make a
/// new account to guess at.
fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(extra: &str) -> AuthGuard {
        let config: Config = toml::from_str(extra).unwrap();
        AuthGuard::new(&config)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    // One account from one address is refused after its burst of failures, while the same
    // account from another address and another account from the same address still work.
    #[test]
    fn failures_per_account_and_address() {
        let g =
            guard("login_failures_per_account_ip_burst = 3.0\nlogin_failures_per_ip_burst = 5.0\n");
        for _ in 0..3 {
            g.login("a@example.com", ip(1)).unwrap();
        }
        let e = g.login("A@Example.com", ip(1)).unwrap_err();
        assert_eq!(e.status, 429);
        assert!(e.retry_after.is_some());
        g.login("a@example.com", ip(2)).unwrap();
        g.login("b@example.com", ip(1)).unwrap();
        g.login("c@example.com", ip(1)).unwrap();
        // The address's own budget (5) is now spent, whatever the account.
        assert_eq!(g.login("d@example.com", ip(1)).unwrap_err().status, 429);
    }

    // Successful logins give their tokens back: an owner who logs in often is never
    // refused, and a refused attempt takes nothing from the other budgets.
    #[test]
    fn successes_do_not_count() {
        let g = guard("login_failures_per_account_ip_burst = 2.0\n");
        for _ in 0..10 {
            let attempt = g.login("a@example.com", ip(1)).unwrap();
            g.login_succeeded(attempt);
        }
        g.login("a@example.com", ip(1)).unwrap();
        g.login("a@example.com", ip(1)).unwrap();
        assert!(g.login("a@example.com", ip(1)).is_err());
    }

    // The per-account ceiling stops a distributed attack that stays under every
    // per-address budget.
    #[test]
    fn account_ceiling_over_all_addresses() {
        let g = guard("login_failures_per_account_burst = 4.0\n");
        for i in 0..4 {
            g.login("a@example.com", ip(i)).unwrap();
        }
        assert_eq!(g.login("a@example.com", ip(9)).unwrap_err().status, 429);
    }

    // Failures another node reports spend the same budgets as failures here, under the
    // same account spelling rules, and never more than a budget holds.
    #[test]
    fn failures_elsewhere_count_here() {
        let g = guard(
            "login_failures_per_account_ip_burst = 3.0
login_failures_per_ip_burst = 9.0
",
        );
        for _ in 0..5 {
            g.failed_elsewhere("A@example.com", ip(1));
        }
        assert_eq!(g.login("a@example.com", ip(1)).unwrap_err().status, 429);
        g.login("a@example.com", ip(2)).unwrap();
        // The address's budget lost five of nine to the reports: four are left.
        for n in 0..4 {
            g.login(&format!("u{n}@example.com"), ip(1)).unwrap();
        }
        assert_eq!(g.login("z@example.com", ip(1)).unwrap_err().status, 429);
    }

    // Sign-ups are limited per address.
    #[test]
    fn signups_per_address() {
        let g = guard("signup_per_ip_burst = 2.0\n");
        g.signup(ip(1)).unwrap();
        g.signup(ip(1)).unwrap();
        assert_eq!(g.signup(ip(1)).unwrap_err().status, 429);
        g.signup(ip(2)).unwrap();
    }
}
