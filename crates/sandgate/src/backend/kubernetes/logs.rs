//! A Sandbox's output: its pod's log (`pods/{name}/log`, what the kubelet keeps of the
//! container's stdout and stderr) with `follow`, `tailLines` and `timestamps` (RFC 3339 with
//! nanoseconds, the kubelet's). A Sandbox without a pod (suspended, or not scheduled yet) has
//! printed nothing the cluster still holds: an empty log.

use futures_util::io::AsyncReadExt;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};

use crate::backend::{BackendError, LogOptions, LogStream};

/// How much one read of the log's body hands on at most.
const CHUNK: usize = 16 * 1024;

fn params(container: Option<&str>, options: LogOptions) -> LogParams {
    LogParams {
        container: container.map(str::to_string),
        follow: options.follow,
        tail_lines: options.tail.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        timestamps: options.timestamps,
        ..LogParams::default()
    }
}

/// Streams the log of `pod`'s `container` (else its only one) as `options` ask.
pub(super) async fn stream(
    pods: &Api<Pod>,
    pod: &str,
    container: Option<&str>,
    options: LogOptions,
) -> Result<LogStream, BackendError> {
    let reader = match pods.log_stream(pod, &params(container, options)).await {
        Ok(reader) => reader,
        Err(kube::Error::Api(status)) if status.code == 404 => {
            return Ok(futures_util::stream::empty().boxed());
        }
        Err(e) => {
            return Err(BackendError::Io(std::io::Error::other(format!(
                "the log of pod {pod}: {e}"
            ))))
        }
    };
    let chunks = futures_util::stream::unfold(Some(Box::pin(reader)), |reader| async move {
        let mut reader = reader?;
        let mut buf = vec![0u8; CHUNK];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(reader)))
            }
            // The error ends the stream.
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(chunks.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_the_log_parameters() {
        let p = params(
            Some("app"),
            LogOptions {
                follow: true,
                tail: Some(3),
                timestamps: true,
            },
        );
        assert!(p.follow && p.timestamps);
        assert_eq!(p.tail_lines, Some(3));
        assert_eq!(p.container.as_deref(), Some("app"));
        let p = params(None, LogOptions::default());
        assert!(!p.follow && !p.timestamps);
        assert_eq!(p.tail_lines, None);
        assert_eq!(p.container, None);
    }
}
