//! Service addresses for integration tests, and protocol-level readiness
//! checks for RabbitMQ, PostgreSQL and a Kafka-protocol broker.
//!
//! `scripts/services` starts the services and prints their addresses as
//! `SURETY_AMQP_URL`, `SURETY_KAFKA_BROKERS` and `SURETY_POSTGRES_URL`.
//! Integration tests ask for an address with [`amqp_url`], [`kafka_brokers`]
//! or [`postgres_url`]: when the variable is missing they return
//! [`Missing`], which a test turns into a skip on a developer machine, unless
//! `SURETY_REQUIRE_SERVICES` is set (as `scripts/test` and CI do), in which
//! case the test must fail. [`require`] does exactly that.
//!
//! ```no_run
//! use surety_testkit::services;
//!
//! # async fn test() {
//! let Some(url) = services::require(services::amqp_url()) else { return };
//! services::check_amqp(&url).await.expect("RabbitMQ answers");
//! # }
//! ```

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Environment variable with the AMQP URL of RabbitMQ.
pub const AMQP_URL: &str = "SURETY_AMQP_URL";
/// Environment variable with the Kafka bootstrap servers.
pub const KAFKA_BROKERS: &str = "SURETY_KAFKA_BROKERS";
/// Environment variable with the PostgreSQL URL.
pub const POSTGRES_URL: &str = "SURETY_POSTGRES_URL";
/// When set (to anything but `0` or empty), a missing service fails the test.
pub const REQUIRE_SERVICES: &str = "SURETY_REQUIRE_SERVICES";

/// How long a readiness check waits for a service to answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// A service address variable is not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The variable.
    pub variable: &'static str,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.variable {
            AMQP_URL | KAFKA_BROKERS | POSTGRES_URL => write!(
                f,
                "{} is not set: start the services with `eval \"$(scripts/services)\"`",
                self.variable
            ),
            other => write!(f, "{other} is not set"),
        }
    }
}

impl std::error::Error for Missing {}

/// A non-empty environment variable a test needs: a service address, or the
/// instructions a test passes to a child process it runs (a crash test's
/// child). Pass the result to [`require`], so that a test run without it
/// skips, or fails when [`REQUIRE_SERVICES`] is set, and never passes
/// without doing anything.
///
/// ```
/// use surety_testkit::services;
///
/// let missing = services::var("SURETY_TESTKIT_EXAMPLE_UNSET").unwrap_err();
/// assert_eq!(missing.to_string(), "SURETY_TESTKIT_EXAMPLE_UNSET is not set");
/// ```
pub fn var(variable: &'static str) -> Result<String, Missing> {
    std::env::var(variable)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .ok_or(Missing { variable })
}

/// The RabbitMQ URL from [`AMQP_URL`].
pub fn amqp_url() -> Result<String, Missing> {
    var(AMQP_URL)
}

/// The Kafka bootstrap servers from [`KAFKA_BROKERS`].
pub fn kafka_brokers() -> Result<String, Missing> {
    var(KAFKA_BROKERS)
}

/// The PostgreSQL URL from [`POSTGRES_URL`].
pub fn postgres_url() -> Result<String, Missing> {
    var(POSTGRES_URL)
}

/// Whether [`REQUIRE_SERVICES`] is set.
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The address, or `None` after printing why the test is skipped.
///
/// # Panics
///
/// When the address is missing and [`REQUIRE_SERVICES`] is set: in CI a
/// missing service is a failure, never a silent skip.
pub fn require(address: Result<String, Missing>) -> Option<String> {
    match address {
        Ok(address) => Some(address),
        Err(missing) if services_required() => {
            panic!("{missing} ({REQUIRE_SERVICES} is set, so this is a failure)")
        }
        Err(missing) => {
            eprintln!("skipping: {missing}");
            None
        }
    }
}

/// A service did not answer as expected.
#[derive(Debug)]
pub struct CheckError(String);

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckError {}

fn fail(msg: impl Into<String>) -> CheckError {
    CheckError(msg.into())
}

/// `host:port` of a URL such as `amqp://user:pass@host:port/vhost`.
pub fn host_port(url: &str) -> Result<String, CheckError> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() || !authority.contains(':') {
        return Err(fail(format!("no host:port in {url:?}")));
    }
    Ok(authority.to_owned())
}

async fn exchange(addr: &str, request: &[u8], reply_len: usize) -> Result<Vec<u8>, CheckError> {
    let talk = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut reply = vec![0; reply_len];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    tokio::time::timeout(CHECK_TIMEOUT, talk)
        .await
        .map_err(|_| fail(format!("{addr} did not answer within {CHECK_TIMEOUT:?}")))?
        .map_err(|e| fail(format!("{addr}: {e}")))
}

/// Opens an AMQP 0-9-1 connection and checks that the broker answers with
/// `Connection.Start`.
pub async fn check_amqp(url: &str) -> Result<(), CheckError> {
    let addr = host_port(url)?;
    let reply = exchange(&addr, b"AMQP\x00\x00\x09\x01", 11).await?;
    // Frame type 1 (method), channel 0, then class 10 / method 10.
    let is_start = reply[0] == 1 && reply[1..3] == [0, 0] && reply[7..11] == [0, 10, 0, 10];
    if is_start {
        Ok(())
    } else {
        Err(fail(format!(
            "{addr} is not an AMQP 0-9-1 broker: {reply:?}"
        )))
    }
}

/// Sends a PostgreSQL `SSLRequest` and checks for the one-byte answer.
pub async fn check_postgres(url: &str) -> Result<(), CheckError> {
    let addr = host_port(url)?;
    let mut request = 8i32.to_be_bytes().to_vec();
    request.extend_from_slice(&80_877_103i32.to_be_bytes());
    let reply = exchange(&addr, &request, 1).await?;
    match reply[0] {
        b'S' | b'N' => Ok(()),
        other => Err(fail(format!(
            "{addr} is not PostgreSQL: answered {other:#x}"
        ))),
    }
}

/// Sends a Kafka `ApiVersions` (v0) request to the first bootstrap server and
/// checks for a matching, error-free response.
pub async fn check_kafka(brokers: &str) -> Result<(), CheckError> {
    let addr = brokers
        .split(',')
        .next()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| fail("no bootstrap server given"))?;
    let correlation_id: i32 = 0x5375_7265;
    let client_id = b"surety-testkit";
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // version 0
    body.extend_from_slice(&correlation_id.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut request = (body.len() as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&body);
    // Response: size, correlation id, error code.
    let reply = exchange(addr, &request, 10).await?;
    let answered_id = i32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
    let error_code = i16::from_be_bytes([reply[8], reply[9]]);
    if answered_id == correlation_id && error_code == 0 {
        Ok(())
    } else {
        Err(fail(format!(
            "{addr} answered ApiVersions with correlation id {answered_id} and error {error_code}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parses_service_urls() {
        assert_eq!(
            host_port("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap(),
            "127.0.0.1:5672"
        );
        assert_eq!(
            host_port("postgres://u:p@localhost:5432/db?sslmode=disable").unwrap(),
            "localhost:5432"
        );
        assert!(host_port("amqp://nohost").is_err());
    }
}
