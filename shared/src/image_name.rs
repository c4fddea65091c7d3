//! Image names as the cluster reads them. A *qualified* name (`registry.example.com/x`,
//! `localhost:5000/x`) is pulled from the registry it names. An *unqualified* one
//! (`busybox`, `team/x:v1`) is looked up in the node's own image store (images an operator
//! imported or pulled there), then pulled from the cluster's embedded registry. The agent
//! and the coordinator decide which is which, and what an unqualified name can match, with
//! these functions, so a submission is judged the way the node will resolve it.

/// Whether `image` names its registry: its first path component has a `.` or a `:`, or is
/// `localhost` (Docker's rule).
pub fn is_qualified(image: &str) -> bool {
    image.split_once('/').is_some_and(|(first, _)| {
        first.contains('.') || first.contains(':') || first == "localhost"
    })
}

/// `name` plus `:latest` when it has neither a tag nor a digest.
pub fn with_default_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || last.contains('@') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// The names under which a node's image store may hold the unqualified `image`: as given,
/// with `:latest`, and in Docker Hub's normalized form (`docker.io/library/busybox:latest`,
/// what `gantry-agent image pull busybox` records). The agent's lookup tries the same
/// names (its tests compare the two).
pub fn local_candidates(image: &str) -> Vec<String> {
    let tagged = with_default_tag(image);
    let hub = match image.contains('/') {
        true => format!("docker.io/{tagged}"),
        false => format!("docker.io/library/{tagged}"),
    };
    let mut names = vec![image.to_owned(), tagged, hub];
    names.dedup();
    names
}

/// Whether a stored image name can be what an unqualified name resolves to on its node
/// (see [`local_candidates`]): unqualified names and Docker Hub's. Images pulled from the
/// cluster's registry or another one are stored under that registry's name and are not.
pub fn answers_unqualified(stored: &str) -> bool {
    !is_qualified(stored) || stored.starts_with("docker.io/")
}

/// Where the unqualified `image` is in the cluster's registry: its repository and the tag
/// or digest its manifest is under (`team/x:v1` → `team/x`, `v1`; `busybox` → `busybox`,
/// `latest`; `x@sha256:…` → `x`, `sha256:…`).
pub fn registry_path(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        let repo = split_tag(name).map_or(name, |(repo, _)| repo);
        return (repo, digest);
    }
    split_tag(image).unwrap_or((image, "latest"))
}

/// `repo:tag` split at a tag's colon (one after the last `/`).
fn split_tag(name: &str) -> Option<(&str, &str)> {
    let (repo, tag) = name.rsplit_once(':')?;
    (!tag.contains('/')).then_some((repo, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names() {
        assert!(is_qualified("127.0.0.1:5000/team/x:v1"));
        assert!(is_qualified("registry.example.com/x"));
        assert!(is_qualified("localhost/x"));
        assert!(is_qualified("docker.io/library/busybox"));
        assert!(!is_qualified("busybox"));
        assert!(!is_qualified("busybox:1.36"));
        assert!(!is_qualified("team/x"));
    }

    #[test]
    fn default_tag() {
        assert_eq!(with_default_tag("busybox"), "busybox:latest");
        assert_eq!(with_default_tag("busybox:1"), "busybox:1");
        assert_eq!(
            with_default_tag("127.0.0.1:5000/x"),
            "127.0.0.1:5000/x:latest"
        );
        assert_eq!(with_default_tag("r/x@sha256:ab"), "r/x@sha256:ab");
    }

    #[test]
    fn candidates_of_a_short_name() {
        assert_eq!(
            local_candidates("busybox"),
            [
                "busybox",
                "busybox:latest",
                "docker.io/library/busybox:latest"
            ]
        );
        assert_eq!(
            local_candidates("team/x:v1"),
            ["team/x:v1", "docker.io/team/x:v1"]
        );
    }

    #[test]
    fn which_stored_names_answer_short_ones() {
        assert!(answers_unqualified("busybox:latest"));
        assert!(answers_unqualified("team/x:v1"));
        assert!(answers_unqualified("docker.io/library/busybox:latest"));
        assert!(!answers_unqualified("10.0.0.1:7080/busybox:latest"));
        assert!(!answers_unqualified("ghcr.io/team/x:v1"));
    }

    #[test]
    fn paths_in_the_registry() {
        assert_eq!(registry_path("busybox"), ("busybox", "latest"));
        assert_eq!(registry_path("team/x:v1"), ("team/x", "v1"));
        let digest = "sha256:0123";
        assert_eq!(registry_path(&format!("x@{digest}")), ("x", digest));
        assert_eq!(
            registry_path(&format!("team/x:v1@{digest}")),
            ("team/x", digest)
        );
    }
}
