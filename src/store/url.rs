//! [`DatabaseUrl`]: which metadata store a node uses (`--database URL`), parsed once at
//! start-up; it prints with its password hidden.

use std::path::PathBuf;

use crate::secret::Secret;

/// A metadata store named by `--database URL`.
#[derive(Debug, Clone, PartialEq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    /// The whole URL, which may hold a password: it prints redacted.
    Postgres(Secret),
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<DatabaseUrl, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = url.parse::<sqlx::postgres::PgConnectOptions>();
            return match opts {
                Ok(_) => Ok(DatabaseUrl::Postgres(Secret::new(url))),
                Err(e) => Err(format!("database URL {} is not a valid PostgreSQL URL: {e}", redact_url(url))),
            };
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("database URL sqlite:// names no file (sqlite://PATH)".into());
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        Err(format!("database URL {} is neither postgres://USER@HOST:PORT/DB nor sqlite://PATH", redact_url(url)))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact_url(url.expose())),
        }
    }
}

/// `scheme://user:<redacted>@host/…`: a URL with its password hidden.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(split) => split,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_parse_and_print_without_password() {
        let p = |s: &str| s.parse::<DatabaseUrl>();
        assert_eq!(p("sqlite:///var/lib/b.db"), Ok(DatabaseUrl::Sqlite("/var/lib/b.db".into())));
        let pg = p("postgres://batchd:hunter2@db.internal:5432/batchd").unwrap();
        assert_eq!(pg.to_string(), "postgres://batchd:<redacted>@db.internal:5432/batchd");
        assert!(!format!("{pg:?}").contains("hunter2"));
        assert!(p("postgresql://u@h/db").is_ok());
        assert!(p("mysql://u@h/db").unwrap_err().contains("neither"));
        assert!(p("sqlite://").is_err());
        let bad = p("postgres://u:pw@h:notaport/db").unwrap_err();
        assert!(bad.contains("not a valid PostgreSQL URL") && !bad.contains("pw@"), "{bad}");
    }
}
