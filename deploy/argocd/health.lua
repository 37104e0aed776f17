-- Argo CD health check for KubeBao's custom resources (BaoSecret, BaoPolicy,
-- KubeBaoInstallation). The same rules as Flux's kstatus, so both tools agree:
--   being deleted or generation not yet observed -> Progressing
--   Stalled=True                                 -> Degraded (the operator gave up; read the message)
--   Ready=True                                   -> Healthy
--   Reconciling=True                             -> Progressing (retrying)
--   Ready=False otherwise                        -> Degraded
local hs = { status = "Progressing", message = "Waiting for the KubeBao operator" }
if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Being deleted"
  return hs
end
if obj.status == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
local ready, stalled, reconciling
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then ready = c end
    if c.type == "Stalled" then stalled = c end
    if c.type == "Reconciling" then reconciling = c end
  end
end
local function text(c)
  if c.message ~= nil and c.message ~= "" then return c.message end
  return c.reason or ""
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = text(stalled)
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready)
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = text(reconciling)
  return hs
end
if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = text(ready)
end
return hs
