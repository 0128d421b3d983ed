//! The image catalogue: templates on the hosts' shared storage that VMs' disks are made from.
//!
//! The center keeps the records (name, path, size, checksum, which VMs use it); a connected
//! host's agent does the file work, since the center need not see the storage. Every host of
//! a cluster sees the same shared storage, so any usable one will do.

use std::path::{Component, Path};
use std::sync::Arc;

use chrono::Utc;
use tern_api::images::{valid_image_name, Image, ImportImage, ImportImageFile};

use crate::agent::AgentError;
use crate::app::App;
use crate::error::CenterError;
use crate::store::{HostRecord, NewEvent};

/// An agent's refusal as the API's: its 4xx stay the caller's to fix.
pub(crate) fn from_agent(e: AgentError) -> CenterError {
    match e.status() {
        Some(409) => CenterError::conflict(e.to_string()),
        Some(400 | 404 | 422) => CenterError::unsatisfiable(e.to_string()),
        _ => CenterError::agent(e.to_string()),
    }
}

/// A usable host with shared storage, to do file work on it.
pub(crate) async fn storage_host(app: &Arc<App>) -> Result<HostRecord, CenterError> {
    let hosts = app.db.read(|tx| Ok::<_, CenterError>(tx.hosts()?)).await?;
    hosts
        .into_iter()
        .find(|h| h.usable() && !h.facts.shared_storage.is_empty())
        .ok_or_else(|| {
            CenterError::conflict(
                "no connected, healthy host with shared storage to do the work: start a host \
                 agent with --shared-storage",
            )
        })
}

pub async fn import(app: &Arc<App>, req: ImportImage, by: String) -> Result<Image, CenterError> {
    if !valid_image_name(&req.name) {
        return Err(CenterError::invalid(format!(
            "image name {:?} is not valid: 1 to 64 of a-z, 0-9, '.' and '-', starting with a \
             letter or digit, without '..'",
            req.name
        )));
    }
    let src = Path::new(&req.source);
    if req.source.len() > crate::vmcheck::MAX_PATH_BYTES
        || !src.is_absolute()
        || src.components().any(|c| c == Component::ParentDir)
    {
        return Err(CenterError::invalid(format!(
            "source {:?} must be an absolute path without '..', on the hosts' shared storage",
            req.source
        )));
    }
    let name = req.name.clone();
    if app
        .db
        .read(move |tx| Ok::<_, CenterError>(tx.image(&name)?))
        .await?
        .is_some()
    {
        return Err(CenterError::conflict(format!(
            "an image named {} exists already; remove it first or pick another name",
            req.name
        )));
    }
    let host = storage_host(app).await?;
    let file = app
        .agent(&host)
        .import_image(&ImportImageFile {
            name: req.name.clone(),
            source: req.source.clone(),
            convert: req.convert,
        })
        .await
        .map_err(from_agent)?;
    let img = Image {
        name: req.name.clone(),
        path: file.path,
        virtual_size_bytes: file.virtual_size_bytes,
        file_size_bytes: file.file_size_bytes,
        sha256: file.sha256,
        source_format: file.source_format,
        imported_at: Utc::now(),
        imported_by: by.clone(),
        used_by: Vec::new(),
    };
    let rec = img.clone();
    let host_name = host.name.clone();
    let stored = app
        .db
        .write(move |tx| {
            if !tx.insert_image(&rec)? {
                return Ok(false);
            }
            tx.add_event(
                NewEvent::info(format!(
                    "image {} imported from {} on host {host_name} ({} bytes virtual, sha256 {})",
                    rec.name, req.source, rec.virtual_size_bytes, rec.sha256
                ))
                .actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(true)
        })
        .await?;
    if !stored {
        return Err(CenterError::conflict(format!(
            "an image named {} was imported meanwhile by someone else",
            img.name
        )));
    }
    Ok(img)
}

pub async fn list(app: &Arc<App>) -> Result<Vec<Image>, CenterError> {
    app.db.read(|tx| Ok::<_, CenterError>(tx.images()?)).await
}

pub async fn get(app: &Arc<App>, name: String) -> Result<Image, CenterError> {
    app.db
        .read(move |tx| tx.image(&name)?.ok_or_else(|| not_found(&name)))
        .await
}

fn not_found(name: &str) -> CenterError {
    CenterError::not_found(format!("no image named {name}: see tern image list"))
}

/// Removes an image no VM uses: its record, then its template.
pub async fn remove(app: &Arc<App>, name: String, by: String) -> Result<(), CenterError> {
    let n = name.clone();
    app.db
        .write(move |tx| {
            let img = tx.image(&n)?.ok_or_else(|| not_found(&n))?;
            if !img.used_by.is_empty() {
                return Err(CenterError::conflict(format!(
                    "image {n} is in use by VM(s) {}: their disks are made from it; delete \
                     them first",
                    img.used_by.join(", ")
                )));
            }
            tx.delete_image(&n)?;
            tx.add_event(
                NewEvent::info(format!("image {n} removed")).actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(())
        })
        .await?;
    // The record is gone, so no new VM uses the template; a file left behind (no host
    // reachable) is only space.
    match storage_host(app).await {
        Ok(host) => {
            if let Err(e) = app.agent(&host).remove_image_file(false, &name).await {
                tracing::warn!(image = %name, error = %e, "the template file was not removed");
            }
        }
        Err(e) => tracing::warn!(image = %name, error = %e, "the template file was not removed"),
    }
    Ok(())
}
