//! The metadata state: accounts, workspaces, workspace roles, and the channel directory.
//!
//! One shard owns the metadata partition and decides its commands; every shard keeps a
//! replica of this state, applied from the committed events, so membership checks and
//! channel routing never leave the shard that needs them.

use super::e2ee::{E2eeCommand, E2eeDecision, E2eeOutcome, E2eeState};
use super::event::{
    ChannelKind, ClusterAsk, ClusterNode, MetaEvent, PreviewRecord, Role, StoredFile,
};
use super::input::{channel_name, channel_name_key, check_email, email_key};
use super::notify::{NotifyCommand, NotifyState};
use super::{check_name, DomainError, Principal};
use super::{GROUP_DM_USERS_MAX, NAME_CHARS_MAX, USER_NAME_CHARS_MAX};
use crate::ids::{ChannelId, FileId, UserId, WorkspaceId};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// An account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Its ID.
    pub id: UserId,
    /// Login email as given.
    pub email: String,
    /// Display name.
    pub name: String,
    /// The password hash (PHC string), interpreted only by the gateway.
    pub password_hash: String,
}

/// A workspace and its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workspace {
    /// Its ID.
    pub id: WorkspaceId,
    /// Its name.
    pub name: String,
    /// Members and their roles, in ID order.
    pub members: BTreeMap<UserId, Role>,
    /// Channel names in use, by [`channel_name_key`] (normalised, lowercase), for
    /// uniqueness.
    channel_names: HashMap<String, ChannelId>,
    /// Every channel of the workspace, in ID order.
    pub channels: BTreeSet<ChannelId>,
}

/// A channel as the directory knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelMeta {
    /// Its ID.
    pub id: ChannelId,
    /// Its workspace.
    pub workspace: WorkspaceId,
    /// Its name (empty for DMs).
    pub name: String,
    /// Its kind.
    pub kind: ChannelKind,
    /// Its creator, who is also its channel admin.
    pub created_by: UserId,
    /// The members it started with.
    pub initial_members: Vec<UserId>,
}

/// The longest file name, in characters.
pub const FILE_NAME_CHARS_MAX: usize = 255;
/// The longest media type of a file, in bytes.
pub const CONTENT_TYPE_BYTES_MAX: usize = 127;

/// A file as the metadata state knows it. A deleted file keeps its entry, so that messages
/// can show it as deleted and its ID is never given out again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// What was stored.
    pub stored: StoredFile,
    /// Whether it was deleted.
    pub deleted: bool,
    /// The previews decided so far, made or not, in the order decided.
    pub previews: Vec<PreviewRecord>,
}

/// A metadata command, decided by the metadata partition's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaCommand {
    /// Sign-up.
    CreateUser {
        /// Login email.
        email: String,
        /// Display name.
        name: String,
        /// The password hash, made by the caller.
        password_hash: String,
    },
    /// A user creates a workspace and becomes its owner.
    CreateWorkspace {
        /// The creator.
        owner: UserId,
        /// The name.
        name: String,
    },
    /// An owner or admin adds a user, by email, as a member.
    AddMember {
        /// The acting principal.
        by: Principal,
        /// The email of the user to add.
        email: String,
    },
    /// A member creates a public or private channel.
    CreateChannel {
        /// The acting principal.
        by: Principal,
        /// The name.
        name: String,
        /// Public or private.
        kind: ChannelKind,
    },
    /// A member opens the DM or group DM of exactly a set of users (the caller included).
    OpenDm {
        /// The acting principal.
        by: Principal,
        /// The other users.
        users: Vec<UserId>,
        /// An end-to-end encrypted DM (`API.md` §14): a different channel from the
        /// plain DM of the same set.
        encrypted: bool,
    },
    /// A member records a file whose bytes are already in the file store.
    StoreFile {
        /// The uploader.
        by: Principal,
        /// The name as given.
        name: String,
        /// Its length in bytes.
        size: u64,
        /// Its media type.
        content_type: String,
        /// The SHA-256 of its bytes.
        sha256: [u8; 32],
        /// The time of the upload, in microseconds since the Unix epoch.
        at_us: u64,
    },
    /// The server records a preview of a live file (made, or never to be).
    RecordPreview {
        /// What was decided.
        record: PreviewRecord,
    },
    /// The uploader or a workspace admin deletes a file.
    DeleteFile {
        /// The acting principal.
        by: Principal,
        /// The file.
        file: FileId,
    },
    /// A user changes their notification preferences or push devices.
    Notify(NotifyCommand),
    /// A user registers or removes a device, uploads its keys, or claims others' keys.
    E2ee(E2eeCommand),
    /// An operator asks for a cluster to be placed on these nodes.
    AskCluster {
        /// The nodes with their addresses between nodes.
        nodes: Vec<ClusterNode>,
    },
}

/// What deciding a metadata command yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaDecision {
    /// A new event to commit and apply.
    New(MetaEvent),
    /// The command names something that already exists (the DM of this set): answer with it
    /// and commit nothing.
    Existing(ChannelId),
    /// A key directory command that changes nothing: its answer.
    E2ee(E2eeOutcome),
}

/// Bits of a channel ID that hold its partition.
pub const PARTITION_BITS: u32 = 16;

/// The partition of a channel, as recorded in its ID.
pub fn partition_of(channel: ChannelId) -> u32 {
    (channel.0 & ((1 << PARTITION_BITS) - 1)) as u32
}

/// The ID of a new channel: the next number, with its partition chosen by a hash of the
/// workspace and that number and recorded in the low bits, so that any thread can route a
/// request for the channel without a directory lookup.
fn channel_id(workspace: WorkspaceId, n: u64, partitions: u32) -> ChannelId {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&workspace.0.to_le_bytes());
    key[8..].copy_from_slice(&n.to_le_bytes());
    let p = xxhash_rust::xxh3::xxh3_64(&key) % partitions.max(1) as u64;
    ChannelId((n << PARTITION_BITS) | p)
}

/// The metadata state.
#[derive(Clone, Debug, Default)]
pub struct MetaState {
    partitions: u32,
    next_id: u64,
    users: HashMap<UserId, User>,
    by_email: HashMap<String, UserId>,
    workspaces: HashMap<WorkspaceId, Workspace>,
    user_workspaces: HashMap<UserId, BTreeSet<WorkspaceId>>,
    channels: HashMap<ChannelId, ChannelMeta>,
    /// DMs by workspace, whether encrypted, and members.
    dms: HashMap<(WorkspaceId, bool, Vec<UserId>), ChannelId>,
    files: HashMap<FileId, FileEntry>,
    /// How many live files have each SHA-256: the file store may drop bytes at zero.
    file_shas: HashMap<[u8; 32], u32>,
    /// Notification preferences and push devices.
    notify: NotifyState,
    /// End-to-end encryption devices and keys.
    e2ee: E2eeState,
    /// The cluster's nodes as last asked.
    cluster: Option<ClusterAsk>,
}

impl MetaState {
    /// An empty state for an engine of `partitions` channel partitions.
    pub fn new(partitions: u32) -> MetaState {
        assert!(partitions > 0 && partitions <= 1 << PARTITION_BITS);
        MetaState {
            partitions,
            ..MetaState::default()
        }
    }

    /// The number of channel partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The ID the next created entity gets. IDs are assigned in decision order, so the
    /// owner applies each event before deciding the next command.
    fn allocate(&self) -> u64 {
        self.next_id.max(1)
    }

    /// Checks that `user` is a member of `workspace` and returns the principal; `NotFound`
    /// for an unknown workspace and for one the user is not in alike.
    pub fn principal(
        &self,
        user: UserId,
        workspace: WorkspaceId,
    ) -> Result<Principal, DomainError> {
        self.workspaces
            .get(&workspace)
            .and_then(|w| w.members.get(&user))
            .map(|role| Principal::checked(user, workspace, *role))
            .ok_or(DomainError::NotFound("workspace"))
    }

    /// The principal for acting on a channel: the channel must exist and the user must be
    /// a member of its workspace. Channel membership is checked by the channel's partition.
    pub fn channel_principal(
        &self,
        user: UserId,
        channel: ChannelId,
    ) -> Result<(Principal, &ChannelMeta), DomainError> {
        let meta = self
            .channels
            .get(&channel)
            .ok_or(DomainError::NotFound("channel"))?;
        let p = self
            .principal(user, meta.workspace)
            .map_err(|_| DomainError::NotFound("channel"))?;
        Ok((p, meta))
    }

    /// Decides a command against the current state.
    pub fn decide(&self, cmd: MetaCommand) -> Result<MetaDecision, DomainError> {
        let id = self.allocate();
        let event = match cmd {
            MetaCommand::CreateUser {
                email,
                name,
                password_hash,
            } => {
                check_email(email.trim())?;
                if self.by_email.contains_key(&email_key(&email)) {
                    return Err(DomainError::Conflict("email is already registered".into()));
                }
                MetaEvent::UserCreated {
                    user: UserId(id),
                    email: email.trim().to_owned(),
                    name: check_name("name", &name, USER_NAME_CHARS_MAX)?,
                    password_hash,
                }
            }
            MetaCommand::CreateWorkspace { owner, name } => {
                if !self.users.contains_key(&owner) {
                    return Err(DomainError::NotFound("user"));
                }
                MetaEvent::WorkspaceCreated {
                    workspace: WorkspaceId(id),
                    name: check_name("name", &name, NAME_CHARS_MAX)?,
                    owner,
                }
            }
            MetaCommand::AddMember { by, email } => {
                if !by.role().is_admin() {
                    return Err(DomainError::Forbidden(
                        "only an owner or admin may add members".into(),
                    ));
                }
                // An account made before addresses were checked is still found by its
                // address; any other address must be well-formed.
                let found = self.by_email.get(&email_key(&email)).copied();
                if found.is_none() {
                    check_email(email.trim())?;
                }
                let user = found.ok_or(DomainError::NotFound("user"))?;
                if self.principal(user, by.workspace()).is_ok() {
                    return Err(DomainError::Conflict("already a member".into()));
                }
                MetaEvent::MemberAdded {
                    workspace: by.workspace(),
                    user,
                    role: Role::Member,
                    by: by.user(),
                }
            }
            MetaCommand::CreateChannel { by, name, kind } => {
                if kind.is_direct() {
                    return Err(DomainError::Invalid(
                        "kind must be \"public\" or \"private\"".into(),
                    ));
                }
                let name = channel_name(&name, NAME_CHARS_MAX)?;
                let ws = self
                    .workspaces
                    .get(&by.workspace())
                    .expect("principal's workspace");
                if ws.channel_names.contains_key(&channel_name_key(&name)) {
                    return Err(DomainError::Conflict("channel name is taken".into()));
                }
                MetaEvent::ChannelCreated {
                    channel: channel_id(by.workspace(), id, self.partitions),
                    workspace: by.workspace(),
                    name,
                    kind,
                    created_by: by.user(),
                    members: vec![by.user()],
                }
            }
            MetaCommand::OpenDm {
                by,
                users,
                encrypted,
            } => {
                let mut set: Vec<UserId> = users;
                set.push(by.user());
                set.sort_unstable();
                set.dedup();
                if set.len() > GROUP_DM_USERS_MAX {
                    return Err(DomainError::Invalid(format!(
                        "a group DM has at most {GROUP_DM_USERS_MAX} users"
                    )));
                }
                if set
                    .iter()
                    .any(|u| self.principal(*u, by.workspace()).is_err())
                {
                    return Err(DomainError::NotFound("user"));
                }
                if let Some(c) = self.dms.get(&(by.workspace(), encrypted, set.clone())) {
                    return Ok(MetaDecision::Existing(*c));
                }
                MetaEvent::ChannelCreated {
                    channel: channel_id(by.workspace(), id, self.partitions),
                    workspace: by.workspace(),
                    name: String::new(),
                    kind: match (set.len() <= 2, encrypted) {
                        (true, false) => ChannelKind::Dm,
                        (false, false) => ChannelKind::GroupDm,
                        (true, true) => ChannelKind::EncryptedDm,
                        (false, true) => ChannelKind::EncryptedGroupDm,
                    },
                    created_by: by.user(),
                    members: set,
                }
            }
            MetaCommand::StoreFile {
                by,
                name,
                size,
                content_type,
                sha256,
                at_us,
            } => MetaEvent::FileStored(Box::new(StoredFile {
                file: FileId(id),
                workspace: by.workspace(),
                user: by.user(),
                name: check_file_name(name)?,
                size,
                content_type: check_content_type(content_type)?,
                sha256,
                at_us,
            })),
            MetaCommand::RecordPreview { record } => {
                let live = self.files.get(&record.file).filter(|e| !e.deleted);
                let Some(entry) = live else {
                    return Err(DomainError::NotFound("file"));
                };
                if entry.previews.iter().any(|p| p.kind == record.kind) {
                    return Err(DomainError::Conflict("the preview is recorded".into()));
                }
                MetaEvent::PreviewMade(Box::new(record))
            }
            MetaCommand::DeleteFile { by, file } => {
                let entry = self
                    .live_file(by.workspace(), file)
                    .ok_or(DomainError::NotFound("file"))?;
                if entry.stored.user != by.user() && !by.role().is_admin() {
                    return Err(DomainError::Forbidden(
                        "only the uploader or a workspace admin may delete a file".into(),
                    ));
                }
                MetaEvent::FileDeleted {
                    file,
                    workspace: by.workspace(),
                    by: by.user(),
                }
            }
            MetaCommand::Notify(cmd) => {
                if self.user(cmd.user()).is_none() {
                    return Err(DomainError::NotFound("user"));
                }
                if let NotifyCommand::SetChannel { user, channel, .. } = &cmd {
                    self.channel_principal(*user, *channel)?;
                }
                self.notify.decide(cmd, id)?.into()
            }
            MetaCommand::E2ee(cmd) => {
                if self.user(cmd.user()).is_none() {
                    return Err(DomainError::NotFound("user"));
                }
                match self.e2ee.decide(cmd, |a, b| self.share_workspace(a, b))? {
                    E2eeDecision::Change(c) => MetaEvent::E2ee(Box::new(c)),
                    E2eeDecision::Answer(a) => return Ok(MetaDecision::E2ee(a)),
                }
            }
            MetaCommand::AskCluster { nodes } => MetaEvent::ClusterAsked(Box::new(ClusterAsk {
                number: self.cluster.as_ref().map_or(0, |c| c.number) + 1,
                nodes: check_cluster_nodes(nodes)?,
            })),
        };
        Ok(MetaDecision::New(event))
    }

    /// Applies a committed (or, on the owner, a just-decided) event.
    pub fn apply(&mut self, event: &MetaEvent) {
        match event {
            MetaEvent::E2ee(change) => self.e2ee.apply(change),
            MetaEvent::ClusterAsked(ask) => self.cluster = Some((**ask).clone()),
            MetaEvent::Notify(change) => {
                if let super::notify::NotifyChange::DeviceAdded(d) = &**change {
                    self.bump(d.id.0);
                }
                self.notify.apply(change);
            }
            MetaEvent::FileStored(stored) => {
                self.bump(stored.file.0);
                *self.file_shas.entry(stored.sha256).or_default() += 1;
                let entry = FileEntry {
                    stored: (**stored).clone(),
                    deleted: false,
                    previews: Vec::new(),
                };
                self.files.insert(stored.file, entry);
            }
            MetaEvent::PreviewMade(record) => {
                let Some(entry) = self.files.get_mut(&record.file).filter(|e| !e.deleted) else {
                    return;
                };
                entry.previews.push((**record).clone());
                if let Some(made) = &record.made {
                    *self.file_shas.entry(made.sha256).or_default() += 1;
                }
            }
            MetaEvent::FileDeleted { file, .. } => {
                let Some(entry) = self.files.get_mut(file).filter(|e| !e.deleted) else {
                    return;
                };
                entry.deleted = true;
                let shas: Vec<[u8; 32]> = std::iter::once(entry.stored.sha256)
                    .chain(
                        entry
                            .previews
                            .iter()
                            .filter_map(|p| Some(p.made.as_ref()?.sha256)),
                    )
                    .collect();
                for sha in shas {
                    if let Some(n) = self.file_shas.get_mut(&sha) {
                        *n -= 1;
                        if *n == 0 {
                            self.file_shas.remove(&sha);
                        }
                    }
                }
            }
            MetaEvent::UserCreated {
                user,
                email,
                name,
                password_hash,
            } => {
                self.bump(user.0);
                self.by_email.insert(email_key(email), *user);
                self.users.insert(
                    *user,
                    User {
                        id: *user,
                        email: email.clone(),
                        name: name.clone(),
                        password_hash: password_hash.clone(),
                    },
                );
            }
            MetaEvent::WorkspaceCreated {
                workspace,
                name,
                owner,
            } => {
                self.bump(workspace.0);
                self.workspaces.insert(
                    *workspace,
                    Workspace {
                        id: *workspace,
                        name: name.clone(),
                        members: BTreeMap::from([(*owner, Role::Owner)]),
                        channel_names: HashMap::new(),
                        channels: BTreeSet::new(),
                    },
                );
                self.user_workspaces
                    .entry(*owner)
                    .or_default()
                    .insert(*workspace);
            }
            MetaEvent::MemberAdded {
                workspace,
                user,
                role,
                ..
            } => {
                if let Some(ws) = self.workspaces.get_mut(workspace) {
                    ws.members.insert(*user, *role);
                    self.user_workspaces
                        .entry(*user)
                        .or_default()
                        .insert(*workspace);
                }
            }
            MetaEvent::ChannelCreated {
                channel,
                workspace,
                name,
                kind,
                created_by,
                members,
            } => {
                self.bump(channel.0 >> PARTITION_BITS);
                if let Some(ws) = self.workspaces.get_mut(workspace) {
                    ws.channels.insert(*channel);
                    if !kind.is_direct() {
                        ws.channel_names.insert(channel_name_key(name), *channel);
                    }
                }
                if kind.is_direct() {
                    let key = (*workspace, kind.is_encrypted(), members.clone());
                    self.dms.insert(key, *channel);
                }
                self.channels.insert(
                    *channel,
                    ChannelMeta {
                        id: *channel,
                        workspace: *workspace,
                        name: name.clone(),
                        kind: *kind,
                        created_by: *created_by,
                        initial_members: members.clone(),
                    },
                );
            }
        }
    }

    /// Notification preferences and push devices.
    pub fn notify(&self) -> &NotifyState {
        &self.notify
    }

    /// End-to-end encryption devices and keys.
    pub fn e2ee(&self) -> &E2eeState {
        &self.e2ee
    }

    /// The cluster's nodes as last asked, if ever.
    pub fn cluster(&self) -> Option<&ClusterAsk> {
        self.cluster.as_ref()
    }

    /// A file of `workspace`, deleted or not; `None` for a file of another workspace.
    pub fn file(&self, workspace: WorkspaceId, file: FileId) -> Option<&FileEntry> {
        self.files
            .get(&file)
            .filter(|e| e.stored.workspace == workspace)
    }

    /// A file by ID alone, deleted or not, for callers that check the workspace themselves.
    pub fn file_any(&self, file: FileId) -> Option<&FileEntry> {
        self.files.get(&file)
    }

    /// A file of `workspace` that is not deleted.
    pub fn live_file(&self, workspace: WorkspaceId, file: FileId) -> Option<&FileEntry> {
        self.file(workspace, file).filter(|e| !e.deleted)
    }

    /// Live files none of whose previews is decided yet, in ID order: the work a preview
    /// maker resumes after a restart.
    pub fn files_without_previews(&self, previewable: fn(&str) -> bool) -> Vec<&FileEntry> {
        let mut out: Vec<&FileEntry> = self
            .files
            .values()
            .filter(|e| !e.deleted && e.previews.is_empty())
            .filter(|e| previewable(&e.stored.content_type))
            .collect();
        out.sort_by_key(|e| e.stored.file);
        out
    }

    /// Whether a live file (or a preview of one) has these bytes (by SHA-256), so that the
    /// store must keep them.
    pub fn file_bytes_in_use(&self, sha256: &[u8; 32]) -> bool {
        self.file_shas.contains_key(sha256)
    }

    fn bump(&mut self, id: u64) {
        self.next_id = self.next_id.max(id + 1);
    }

    /// A user by ID.
    pub fn user(&self, id: UserId) -> Option<&User> {
        self.users.get(&id)
    }

    /// A user by login email (case-insensitive).
    pub fn user_by_email(&self, email: &str) -> Option<&User> {
        self.by_email
            .get(&email_key(email))
            .and_then(|id| self.users.get(id))
    }

    /// A workspace, only if the principal's own.
    pub fn workspace(&self, by: &Principal) -> &Workspace {
        self.workspaces
            .get(&by.workspace())
            .expect("a principal's workspace exists")
    }

    /// Whether two users belong to a common workspace (a user shares one with themselves
    /// when they belong to any): only then may one see the other's presence.
    pub fn share_workspace(&self, a: UserId, b: UserId) -> bool {
        let (Some(wa), Some(wb)) = (self.user_workspaces.get(&a), self.user_workspaces.get(&b))
        else {
            return false;
        };
        let (small, large) = if wa.len() <= wb.len() {
            (wa, wb)
        } else {
            (wb, wa)
        };
        small.iter().any(|w| large.contains(w))
    }

    /// The workspaces a user belongs to, in ID order.
    pub fn workspaces_of(&self, user: UserId) -> Vec<&Workspace> {
        self.user_workspaces
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|w| self.workspaces.get(w))
            .collect()
    }

    /// A channel's directory entry.
    pub fn channel(&self, id: ChannelId) -> Option<&ChannelMeta> {
        self.channels.get(&id)
    }

    /// Every channel in the directory (for partitions to find theirs at start).
    pub fn channels(&self) -> impl Iterator<Item = &ChannelMeta> {
        self.channels.values()
    }
}

/// A file name is stored as given, but it must be 1–255 characters without control
/// characters (which no file system or browser shows sensibly).
fn check_file_name(name: String) -> Result<String, DomainError> {
    let chars = name.chars().count();
    if chars == 0 || chars > FILE_NAME_CHARS_MAX {
        return Err(DomainError::Invalid(format!(
            "a file name is 1 to {FILE_NAME_CHARS_MAX} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(DomainError::Invalid(
            "a file name may not contain control characters".into(),
        ));
    }
    Ok(name)
}

/// A media type is `type/subtype` in printable ASCII without spaces, as the gateway
/// normalises it.
fn check_content_type(t: String) -> Result<String, DomainError> {
    let ok = t.len() <= CONTENT_TYPE_BYTES_MAX
        && t.split_once('/')
            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        && t.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(DomainError::Invalid(format!("{t:?} is not a media type")));
    }
    Ok(t)
}

/// At most this many nodes in a cluster ask.
pub const CLUSTER_NODES_MAX: usize = 64;

/// The nodes of a cluster ask, sorted by ID: 1 to [`CLUSTER_NODES_MAX`] of them, IDs above
/// 0 and each once, addresses `IP:PORT`.
fn check_cluster_nodes(mut nodes: Vec<ClusterNode>) -> Result<Vec<ClusterNode>, DomainError> {
    if nodes.is_empty() || nodes.len() > CLUSTER_NODES_MAX {
        return Err(DomainError::Invalid(format!(
            "a cluster has 1 to {CLUSTER_NODES_MAX} nodes"
        )));
    }
    nodes.sort_by_key(|n| n.id);
    for (i, node) in nodes.iter().enumerate() {
        if node.id == 0 || (i > 0 && nodes[i - 1].id == node.id) {
            return Err(DomainError::Invalid(format!(
                "node id {} is 0 or named twice",
                node.id
            )));
        }
        if node.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(DomainError::Invalid(format!(
                "{:?} is not IP:PORT",
                node.addr
            )));
        }
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &mut MetaState, cmd: MetaCommand) -> Result<MetaEvent, DomainError> {
        match state.decide(cmd)? {
            MetaDecision::New(e) => {
                state.apply(&e);
                Ok(e)
            }
            MetaDecision::Existing(c) => panic!("unexpected existing {c}"),
            MetaDecision::E2ee(a) => panic!("unexpected answer {a:?}"),
        }
    }

    fn user(state: &mut MetaState, email: &str) -> UserId {
        match run(
            state,
            MetaCommand::CreateUser {
                email: email.into(),
                name: "N".into(),
                password_hash: "h".into(),
            },
        )
        .unwrap()
        {
            MetaEvent::UserCreated { user, .. } => user,
            _ => unreachable!(),
        }
    }

    fn workspace(state: &mut MetaState, owner: UserId) -> WorkspaceId {
        let create = MetaCommand::CreateWorkspace {
            owner,
            name: "acme".into(),
        };
        match run(state, create).unwrap() {
            MetaEvent::WorkspaceCreated { workspace, .. } => workspace,
            other => panic!("{other:?}"),
        }
    }

    // Files: names are stored as given within their rules; only the uploader or an admin
    // deletes; a deleted file stays known as deleted; bytes count as in use while any live
    // file has them.
    #[test]
    fn files_store_delete_and_share_bytes() {
        let mut s = MetaState::new(8);
        let a = user(&mut s, "a@x.io");
        let b = user(&mut s, "b@x.io");
        let c = user(&mut s, "c@x.io");
        let w = workspace(&mut s, a);
        let pa = s.principal(a, w).unwrap();
        for email in ["b@x.io", "c@x.io"] {
            let add = MetaCommand::AddMember {
                by: pa,
                email: email.into(),
            };
            run(&mut s, add).unwrap();
        }
        let (pb, pc) = (s.principal(b, w).unwrap(), s.principal(c, w).unwrap());
        let store = |by: Principal, name: &str| MetaCommand::StoreFile {
            by,
            name: name.into(),
            size: 3,
            content_type: "text/plain".into(),
            sha256: [9; 32],
            at_us: 1,
        };
        let stored = |e| match e {
            MetaEvent::FileStored(f) => f.file,
            other => panic!("{other:?}"),
        };
        let f1 = stored(run(&mut s, store(pb, "../../x")).unwrap());
        let f2 = stored(run(&mut s, store(pb, "copy.txt")).unwrap());
        assert_eq!(s.live_file(w, f1).unwrap().stored.name, "../../x");
        for bad in ["", "a\nb", &"n".repeat(FILE_NAME_CHARS_MAX + 1)] {
            assert!(matches!(
                s.decide(store(pb, bad)),
                Err(DomainError::Invalid(_))
            ));
        }
        let delete = |by, file| MetaCommand::DeleteFile { by, file };
        assert!(matches!(
            s.decide(delete(pc, f1)),
            Err(DomainError::Forbidden(_))
        ));
        run(&mut s, delete(pb, f1)).unwrap();
        assert!(s.live_file(w, f1).is_none());
        assert!(s.file(w, f1).unwrap().deleted);
        assert!(s.file_bytes_in_use(&[9; 32]), "f2 has the same bytes");
        assert!(matches!(
            s.decide(delete(pb, f1)),
            Err(DomainError::NotFound("file"))
        ));
        // Files wait for a preview only if their media type can have one.
        let waiting = |f: fn(&str) -> bool| s.files_without_previews(f).len();
        assert_eq!(waiting(|t| t == "text/plain"), 1);
        assert_eq!(waiting(|t| t.starts_with("image/")), 0);
        // A preview's bytes are in use while its file lives; a kind is decided once.
        let preview = |file, kind: &str| MetaCommand::RecordPreview {
            record: PreviewRecord {
                file,
                kind: kind.into(),
                made: Some(super::super::event::PreviewMade {
                    width: 3,
                    height: 2,
                    size: 10,
                    content_type: "image/png".into(),
                    sha256: [4; 32],
                }),
            },
        };
        run(&mut s, preview(f2, "thumb")).unwrap();
        assert!(s.file_bytes_in_use(&[4; 32]));
        assert!(matches!(
            s.decide(preview(f2, "thumb")),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            s.decide(preview(f1, "thumb")),
            Err(DomainError::NotFound("file"))
        ));
        assert!(s.files_without_previews(|_| true).is_empty());
        run(&mut s, delete(pa, f2)).unwrap();
        assert!(!s.file_bytes_in_use(&[9; 32]));
        assert!(!s.file_bytes_in_use(&[4; 32]));
    }

    // Workspace roles gate adding members, membership gates principals, and the same set
    // of users always gets the same DM.
    #[test]
    fn roles_principals_and_dms() {
        let mut s = MetaState::new(8);
        let a = user(&mut s, "a@x.io");
        let b = user(&mut s, "B@x.io");
        let c = user(&mut s, "c@x.io");
        assert!(matches!(
            run(
                &mut s,
                MetaCommand::CreateUser {
                    email: "b@X.io".into(),
                    name: "n".into(),
                    password_hash: "h".into()
                }
            ),
            Err(DomainError::Conflict(_))
        ));
        let w = workspace(&mut s, a);
        assert!(s.principal(b, w).is_err());
        let pa = s.principal(a, w).unwrap();
        run(
            &mut s,
            MetaCommand::AddMember {
                by: pa,
                email: "b@x.io".into(),
            },
        )
        .unwrap();
        let pb = s.principal(b, w).unwrap();
        assert_eq!(pb.role(), Role::Member);
        assert!(matches!(
            run(
                &mut s,
                MetaCommand::AddMember {
                    by: pb,
                    email: "c@x.io".into()
                }
            ),
            Err(DomainError::Forbidden(_))
        ));
        assert!(matches!(
            s.decide(MetaCommand::OpenDm {
                by: pa,
                users: vec![c],
                encrypted: false,
            }),
            Err(DomainError::NotFound("user"))
        ));
        let MetaEvent::ChannelCreated {
            channel: dm, kind, ..
        } = run(
            &mut s,
            MetaCommand::OpenDm {
                by: pa,
                users: vec![b],
                encrypted: false,
            },
        )
        .unwrap()
        else {
            unreachable!()
        };
        assert_eq!(kind, ChannelKind::Dm);
        assert_eq!(
            s.decide(MetaCommand::OpenDm {
                by: pb,
                users: vec![a, a],
                encrypted: false,
            }),
            Ok(MetaDecision::Existing(dm))
        );
        // The encrypted DM of the same set is another channel, found again as itself.
        let MetaEvent::ChannelCreated {
            channel: sealed,
            kind,
            ..
        } = run(
            &mut s,
            MetaCommand::OpenDm {
                by: pb,
                users: vec![a],
                encrypted: true,
            },
        )
        .unwrap()
        else {
            unreachable!()
        };
        assert_eq!((kind, kind.as_str()), (ChannelKind::EncryptedDm, "dm"));
        assert_ne!(sealed, dm);
        assert_eq!(
            s.decide(MetaCommand::OpenDm {
                by: pa,
                users: vec![b],
                encrypted: true,
            }),
            Ok(MetaDecision::Existing(sealed))
        );
        let MetaEvent::ChannelCreated {
            channel: general, ..
        } = run(
            &mut s,
            MetaCommand::CreateChannel {
                by: pb,
                name: "general".into(),
                kind: ChannelKind::Public,
            },
        )
        .unwrap()
        else {
            unreachable!()
        };
        assert!(partition_of(general) < 8);
        assert!(general.0 >> PARTITION_BITS > dm.0 >> PARTITION_BITS);
        assert!(matches!(
            s.decide(MetaCommand::CreateChannel {
                by: pa,
                name: "General".into(),
                kind: ChannelKind::Private
            }),
            Err(DomainError::Conflict(_))
        ));
    }

    // Channel preferences are only for channels of the user's workspaces; a stranger's
    // attempt is the same NotFound as an unknown channel, and prefs replay from events.
    #[test]
    fn notify_prefs_stay_in_reach() {
        use crate::domain::notify::{ChannelPrefsInput, NotifyCommand, PrefsPatch};
        let mut s = MetaState::new(8);
        let a = user(&mut s, "a@x.io");
        let m = user(&mut s, "m@x.io");
        let w = workspace(&mut s, a);
        let by = s.principal(a, w).unwrap();
        let MetaEvent::ChannelCreated { channel, .. } = run(
            &mut s,
            MetaCommand::CreateChannel {
                by,
                name: "general".into(),
                kind: ChannelKind::Public,
            },
        )
        .unwrap() else {
            unreachable!()
        };
        let set = |user| {
            MetaCommand::Notify(NotifyCommand::SetChannel {
                user,
                channel,
                prefs: ChannelPrefsInput {
                    level: Some("all".into()),
                    muted: Some(true),
                },
            })
        };
        assert_eq!(s.decide(set(m)), Err(DomainError::NotFound("channel")));
        let event = run(&mut s, set(a)).unwrap();
        assert!(s.notify().channel(a, channel).muted);
        let patch = MetaCommand::Notify(NotifyCommand::PatchPrefs {
            user: a,
            patch: PrefsPatch {
                push: Some("none".into()),
                ..PrefsPatch::default()
            },
        });
        let patched = run(&mut s, patch).unwrap();
        let mut replica = MetaState::new(8);
        replica.apply(&event);
        replica.apply(&patched);
        assert_eq!(replica.notify().prefs(a), s.notify().prefs(a));
        assert!(replica.notify().channel(a, channel).muted);
    }

    // An account whose address was stored before addresses were checked keeps working: it
    // is found by that address, and can be added to a workspace by it; new sign-ups with
    // such an address are refused.
    #[test]
    fn accounts_from_before_the_email_rules_keep_working() {
        let mut s = MetaState::new(8);
        let owner = user(&mut s, "owner@x.io");
        let legacy = UserId(s.allocate());
        s.apply(&MetaEvent::UserCreated {
            user: legacy,
            email: "Old Style@Intranet".into(),
            name: "Old".into(),
            password_hash: "h".into(),
        });
        assert_eq!(
            s.user_by_email("old style@intranet").map(|u| u.id),
            Some(legacy)
        );
        let MetaEvent::WorkspaceCreated { workspace: w, .. } = run(
            &mut s,
            MetaCommand::CreateWorkspace {
                owner,
                name: "acme".into(),
            },
        )
        .unwrap() else {
            unreachable!()
        };
        let by = s.principal(owner, w).unwrap();
        run(
            &mut s,
            MetaCommand::AddMember {
                by,
                email: "OLD STYLE@INTRANET".into(),
            },
        )
        .unwrap();
        assert!(s.principal(legacy, w).is_ok());
        for email in ["old style@intranet", "other style@intranet"] {
            assert!(matches!(
                s.decide(MetaCommand::CreateUser {
                    email: email.into(),
                    name: "n".into(),
                    password_hash: "h".into(),
                }),
                Err(DomainError::Invalid(_))
            ));
        }
    }

    // Cluster asks are numbered in the order they are decided, each one more than the
    // last; the state keeps the last; nodes are sorted, and bad ones refused.
    #[test]
    fn cluster_asks_are_numbered_and_checked() {
        let mut s = MetaState::new(8);
        let node = |id: u64, port: u16| ClusterNode {
            id,
            addr: format!("127.0.0.1:{port}"),
        };
        assert!(s.cluster().is_none());
        let ask = |nodes| MetaCommand::AskCluster { nodes };
        let first = run(&mut s, ask(vec![node(2, 2), node(1, 1)])).unwrap();
        let MetaEvent::ClusterAsked(first) = first else {
            panic!("{first:?}")
        };
        assert_eq!(first.number, 1);
        assert_eq!(first.nodes, [node(1, 1), node(2, 2)]);
        run(&mut s, ask(vec![node(3, 3)])).unwrap();
        let last = s.cluster().unwrap();
        assert_eq!((last.number, &last.nodes[..]), (2, &[node(3, 3)][..]));
        for bad in [
            vec![],
            vec![node(0, 1)],
            vec![node(1, 1), node(1, 2)],
            vec![ClusterNode {
                id: 1,
                addr: "nowhere".into(),
            }],
            (1..=65).map(|i| node(i, 1)).collect(),
        ] {
            assert!(
                matches!(run(&mut s, ask(bad.clone())), Err(DomainError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(s.cluster().unwrap().number, 2);
    }
}
