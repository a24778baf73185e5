//! Classifying how an exchange ended, for the `error_type` label.
//!
//! The HTTP status alone cannot tell a timeout from a refused connection (both can be Envoy's own
//! 5xx) or a client that went away mid-stream (status 200). Envoy's response flags can, so they
//! take precedence over the status. Flag values are Envoy's `response.flags` property bits
//! (`StreamInfo::ResponseFlag` legacy bitmask), checked against Envoy 1.40 by the integration tests.

/// Envoy response flag bits used here.
pub mod flags {
    /// UH: no healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
    /// UT: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    /// LR: connection local reset.
    pub const LOCAL_RESET: u64 = 0x8;
    /// UR: upstream remote reset.
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    /// UF: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// UC: upstream connection termination.
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    /// UO: upstream overflow (circuit breaker).
    pub const UPSTREAM_OVERFLOW: u64 = 0x80;
    /// DC: downstream connection termination.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000;
    /// URX: upstream retry limit exceeded.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 0x8000;
    /// SI: stream idle timeout.
    pub const STREAM_IDLE_TIMEOUT: u64 = 0x10000;
    /// UMSDR: upstream max stream duration reached.
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: u64 = 0x80000;
    /// DT: request or connection exceeded its max duration.
    pub const DURATION_TIMEOUT: u64 = 0x400000;
    /// UPE: upstream protocol error.
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 0x800000;
    /// DR: downstream remote reset.
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 0x10000000;
}

/// Value of the `error_type` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// The exchange completed (1xx–3xx).
    None,
    /// The upstream answered 429.
    UpstreamRateLimit,
    /// Any other 4xx.
    ClientError,
    /// A 5xx not explained by a flag below.
    ServerError,
    /// Upstream timeout, idle timeout or max duration (also a plain 504).
    Timeout,
    /// Upstream connection failure or reset, before or during the response.
    Network,
    /// The client went away before the response was complete.
    Canceled,
    /// This filter rejected the request (its own 429).
    RateLimited,
    /// The model and every model of its fallback chain had an open circuit: this filter
    /// answered 503 (see [`crate::resilience`]).
    CircuitOpen,
}

impl ErrorType {
    /// All values, in label order.
    pub const ALL: [ErrorType; 9] = [
        ErrorType::None,
        ErrorType::UpstreamRateLimit,
        ErrorType::ClientError,
        ErrorType::ServerError,
        ErrorType::Timeout,
        ErrorType::Network,
        ErrorType::Canceled,
        ErrorType::RateLimited,
        ErrorType::CircuitOpen,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::None => "none",
            ErrorType::UpstreamRateLimit => "upstream_rate_limit",
            ErrorType::ClientError => "client_error",
            ErrorType::ServerError => "server_error",
            ErrorType::Timeout => "timeout",
            ErrorType::Network => "network",
            ErrorType::Canceled => "canceled",
            ErrorType::RateLimited => "rate_limited",
            ErrorType::CircuitOpen => "circuit_open",
        }
    }
}

/// Classifies an exchange from its final status (0 when no response was sent), Envoy's response
/// flags, and whether this filter produced the response itself.
pub fn classify(status: u16, response_flags: u64, local_rejection: bool) -> ErrorType {
    use flags::*;
    if local_rejection {
        return ErrorType::RateLimited;
    }
    // URX (retries exhausted) says nothing of its own: the last attempt's answer is what the
    // client got (its status), and a network failure of that attempt has its own flag.
    let any = |mask: u64| response_flags & mask != 0;
    if any(DOWNSTREAM_CONNECTION_TERMINATION | DOWNSTREAM_REMOTE_RESET) {
        return ErrorType::Canceled;
    }
    if any(UPSTREAM_REQUEST_TIMEOUT | STREAM_IDLE_TIMEOUT | UPSTREAM_MAX_STREAM_DURATION_REACHED | DURATION_TIMEOUT) {
        return ErrorType::Timeout;
    }
    if any(NO_HEALTHY_UPSTREAM
        | LOCAL_RESET
        | UPSTREAM_REMOTE_RESET
        | UPSTREAM_CONNECTION_FAILURE
        | UPSTREAM_CONNECTION_TERMINATION
        | UPSTREAM_OVERFLOW
        | UPSTREAM_PROTOCOL_ERROR)
    {
        return ErrorType::Network;
    }
    match status {
        0 => ErrorType::Network,
        429 => ErrorType::UpstreamRateLimit,
        504 => ErrorType::Timeout,
        400..=499 => ErrorType::ClientError,
        500..=599 => ErrorType::ServerError,
        _ => ErrorType::None,
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;

    #[test]
    fn status_codes() {
        assert_eq!(classify(200, 0, false), ErrorType::None);
        assert_eq!(classify(304, 0, false), ErrorType::None);
        assert_eq!(classify(429, 0, false), ErrorType::UpstreamRateLimit);
        assert_eq!(classify(400, 0, false), ErrorType::ClientError);
        assert_eq!(classify(500, 0, false), ErrorType::ServerError);
        assert_eq!(classify(503, 0, false), ErrorType::ServerError);
        assert_eq!(classify(504, 0, false), ErrorType::Timeout);
        assert_eq!(classify(429, 0, true), ErrorType::RateLimited);
    }

    #[test]
    fn flags_beat_status() {
        assert_eq!(classify(503, UPSTREAM_CONNECTION_FAILURE, false), ErrorType::Network);
        assert_eq!(classify(200, UPSTREAM_REMOTE_RESET, false), ErrorType::Network);
        assert_eq!(classify(504, UPSTREAM_REQUEST_TIMEOUT, false), ErrorType::Timeout);
        assert_eq!(classify(200, DOWNSTREAM_CONNECTION_TERMINATION, false), ErrorType::Canceled);
        assert_eq!(classify(0, DOWNSTREAM_REMOTE_RESET | UPSTREAM_REMOTE_RESET, false), ErrorType::Canceled);
        assert_eq!(classify(0, 0, false), ErrorType::Network);
        // Retries exhausted: the last answer decides, unless the last attempt failed itself.
        assert_eq!(classify(503, UPSTREAM_RETRY_LIMIT_EXCEEDED, false), ErrorType::ServerError);
        assert_eq!(classify(429, UPSTREAM_RETRY_LIMIT_EXCEEDED, false), ErrorType::UpstreamRateLimit);
        assert_eq!(
            classify(503, UPSTREAM_RETRY_LIMIT_EXCEEDED | UPSTREAM_CONNECTION_FAILURE, false),
            ErrorType::Network
        );
    }

    #[test]
    fn labels_are_distinct() {
        let mut seen: Vec<&str> = ErrorType::ALL.iter().map(|e| e.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), ErrorType::ALL.len());
    }
}
