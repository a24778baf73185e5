//! Which LLM API operation a request path is.
//!
//! Matching is by path suffix (query string ignored), so gateways that mount an API under their
//! own prefix (`/openai/deployments/x/chat/completions`, `/anthropic/v1/messages`, Vertex AI's
//! `/v1/projects/p/locations/l/publishers/google/models/m:generateContent`) are metered too.
//! Paths that are no LLM operation (`/v1/models`, `/v1/messages/count_tokens`, health checks)
//! pass through unmetered.

use crate::scan::usage::UsageFormat;

/// An LLM API operation the filter meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// OpenAI `…/chat/completions`
    Chat,
    /// OpenAI `…/completions` (legacy text completions)
    Completion,
    /// OpenAI `…/embeddings`
    Embeddings,
    /// OpenAI Responses API `…/responses`
    Responses,
    /// Anthropic Messages API `…/v1/messages`
    Messages,
    /// Gemini `…/models/{model}:generateContent` or `:streamGenerateContent`
    GenerateContent,
}

impl Operation {
    /// Every operation, in label order.
    pub const ALL: [Operation; 6] = [
        Operation::Chat,
        Operation::Completion,
        Operation::Embeddings,
        Operation::Responses,
        Operation::Messages,
        Operation::GenerateContent,
    ];

    /// Operation for a request path, `None` for paths that are not metered.
    pub fn from_path(path: &[u8]) -> Option<Self> {
        let path = strip_query(path)?;
        if gemini_model(path).is_some() {
            return Some(Operation::GenerateContent);
        }
        let path = path.strip_suffix(b"/").unwrap_or(path);
        if path.ends_with(b"/chat/completions") {
            Some(Operation::Chat)
        } else if path.ends_with(b"/completions") {
            Some(Operation::Completion)
        } else if path.ends_with(b"/embeddings") {
            Some(Operation::Embeddings)
        } else if path.ends_with(b"/responses") {
            Some(Operation::Responses)
        } else if path.ends_with(b"/v1/messages") {
            Some(Operation::Messages)
        } else {
            None
        }
    }

    /// The model named in the path (Gemini puts it there, not in the body).
    pub fn model_from_path(path: &[u8]) -> Option<String> {
        let model = gemini_model(strip_query(path)?)?;
        std::str::from_utf8(model).ok().map(str::to_string)
    }

    /// OpenTelemetry GenAI `gen_ai.operation.name`: its well-known values (`chat`,
    /// `text_completion`, `embeddings`, `generate_content`); the Responses API and Anthropic
    /// Messages are chat.
    pub fn otel_name(self) -> &'static str {
        match self {
            Operation::Chat | Operation::Responses | Operation::Messages => "chat",
            Operation::Completion => "text_completion",
            Operation::Embeddings => "embeddings",
            Operation::GenerateContent => "generate_content",
        }
    }

    /// OpenTelemetry GenAI `gen_ai.provider.name`, from the API format: `anthropic` for the
    /// Messages API, `gcp.gemini` for Gemini, `openai` for the OpenAI-compatible APIs.
    pub fn provider(self) -> &'static str {
        match self {
            Operation::Messages => "anthropic",
            Operation::GenerateContent => "gcp.gemini",
            _ => "openai",
        }
    }

    /// Label value (OpenTelemetry GenAI `gen_ai.operation.name` style).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::Completion => "completion",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
            Operation::Messages => "messages",
            Operation::GenerateContent => "generate_content",
        }
    }

    /// How this operation's responses report usage.
    pub fn usage_format(self) -> UsageFormat {
        match self {
            Operation::Chat | Operation::Completion | Operation::Embeddings => UsageFormat::OpenAiChat,
            Operation::Responses => UsageFormat::OpenAiResponses,
            Operation::Messages => UsageFormat::Anthropic,
            Operation::GenerateContent => UsageFormat::Gemini,
        }
    }
}

fn strip_query(path: &[u8]) -> Option<&[u8]> {
    let end = path.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(path.len());
    path.get(..end)
}

/// The `{model}` of `…/models/{model}:generateContent` or `:streamGenerateContent`.
fn gemini_model(path: &[u8]) -> Option<&[u8]> {
    let colon = path.iter().rposition(|&b| b == b':')?;
    let (head, method) = path.split_at(colon);
    if method != b":generateContent" && method != b":streamGenerateContent" {
        return None;
    }
    let start = head.windows(8).rposition(|w| w == b"/models/")? + 8;
    let model = head.get(start..)?;
    (!model.is_empty() && !model.contains(&b'/')).then_some(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(Operation::from_path(b"/v1/chat/completions"), Some(Operation::Chat));
        assert_eq!(
            Operation::from_path(b"/openai/deployments/gpt/chat/completions?api-version=2024-10-21"),
            Some(Operation::Chat)
        );
        assert_eq!(Operation::from_path(b"/v1/completions/"), Some(Operation::Completion));
        assert_eq!(Operation::from_path(b"/v1/embeddings"), Some(Operation::Embeddings));
        assert_eq!(Operation::from_path(b"/v1/responses"), Some(Operation::Responses));
        assert_eq!(Operation::from_path(b"/v1/responses/resp_123"), None);
        assert_eq!(Operation::from_path(b"/v1/messages"), Some(Operation::Messages));
        assert_eq!(Operation::from_path(b"/anthropic/v1/messages?beta=true"), Some(Operation::Messages));
        assert_eq!(Operation::from_path(b"/v1/messages/count_tokens"), None);
        assert_eq!(Operation::from_path(b"/v1/threads/t1/messages"), None);
        assert_eq!(
            Operation::from_path(b"/v1beta/models/gemini-2.5-flash:generateContent"),
            Some(Operation::GenerateContent)
        );
        assert_eq!(
            Operation::from_path(b"/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"),
            Some(Operation::GenerateContent)
        );
        assert_eq!(Operation::from_path(b"/v1beta/models/gemini-2.5-pro:countTokens"), None);
        assert_eq!(Operation::from_path(b"/v1/models"), None);
        assert_eq!(Operation::from_path(b"/healthz"), None);
        assert_eq!(Operation::from_path(b""), None);
        assert_eq!(Operation::from_path(b"/x?y=/chat/completions"), None);
    }

    #[test]
    fn gemini_models_come_from_the_path() {
        let m = |p: &[u8]| Operation::model_from_path(p);
        assert_eq!(m(b"/v1beta/models/gemini-2.5-flash:generateContent").as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(
            m(b"/v1/projects/p/locations/us/publishers/google/models/gemini-2.0-flash-001:streamGenerateContent?alt=sse")
                .as_deref(),
            Some("gemini-2.0-flash-001")
        );
        assert_eq!(m(b"/v1beta/models/:generateContent"), None);
        assert_eq!(m(b"/v1/chat/completions"), None);
    }

    #[test]
    fn labels_are_distinct() {
        let mut seen: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), Operation::ALL.len());
    }
}
