{{/* Names, labels and the checks every template relies on. */}}
{{- define "voxbox.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "voxbox.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "voxbox.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "voxbox.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "voxbox.tag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "worker"). */}}
{{- define "voxbox.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voxbox.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "voxbox.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "voxbox.image" -}}
{{- printf "%s/voxbox-%s:%s" (trimSuffix "/" .ctx.Values.image.registry) .component (include "voxbox.tag" .ctx) -}}
{{- end -}}

{{- define "voxbox.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-worker" (include "voxbox.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "voxbox.workerName" -}}{{ include "voxbox.fullname" . }}-worker{{- end -}}
{{- define "voxbox.gatewayName" -}}{{ include "voxbox.fullname" . }}-gateway{{- end -}}

{{/* The gateways' account: their own when the chart creates accounts (no store role), else the given one. */}}
{{- define "voxbox.gatewayServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- include "voxbox.gatewayName" . -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.gatewayName -}}
{{- end -}}
{{- end -}}

{{/* The Secret the gateway reads its credentials from: the existing one, or the chart's. */}}
{{- define "voxbox.authSecretName" -}}
{{- default (printf "%s-auth" (include "voxbox.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The store credentials' Secret, or nothing (the pod's identity is used). */}}
{{- define "voxbox.storeSecretName" -}}
{{- if .Values.storeCredentials.existingSecret -}}
{{- .Values.storeCredentials.existingSecret -}}
{{- else if or .Values.storeCredentials.accessKeyId .Values.storeCredentials.secretAccessKey -}}
{{- printf "%s-store" (include "voxbox.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The prune mode: shared volumes default to the heartbeat-based grace mode (flock is unreliable on NFS). */}}
{{- define "voxbox.prune" -}}
{{- if .Values.models.prune -}}
{{- .Values.models.prune -}}
{{- else if eq .Values.models.type "existingClaim" -}}
shared-grace
{{- else -}}
local
{{- end -}}
{{- end -}}

{{/* Seconds the worker drains on SIGTERM, and the pod's grace period beyond it. */}}
{{- define "voxbox.gracePeriod" -}}
{{- add (int .Values.worker.requestTimeoutSeconds) (int .Values.worker.terminationExtraSeconds) (int .Values.worker.preStopSleepSeconds) -}}
{{- end -}}

{{/* Settings checked when rendering, so a bad combination fails at `helm install`, not in a crash loop. */}}
{{- define "voxbox.validate" -}}
{{- if not (or .Values.auth.existingSecret .Values.auth.basicAuthUsers .Values.auth.apiKeys) -}}
{{- fail "the gateway never runs open: set auth.basicAuthUsers (user:password), auth.apiKeys, or auth.existingSecret (a Secret with BASIC_AUTH_USERS and/or API_KEYS)" -}}
{{- end -}}
{{- if and (ne .Values.worker.engine "embedded") (not .Values.model.uri) (ne .Values.models.type "existingClaim") -}}
{{- fail "worker.engine=voxcpm needs model.uri (s3://bucket/prefix/ of a published model), or models.type=existingClaim with the weights already on it" -}}
{{- end -}}
{{- if not (has .Values.models.type (list "ephemeral" "existingClaim" "emptyDir")) -}}
{{- fail (printf "models.type=%q must be ephemeral, existingClaim or emptyDir" .Values.models.type) -}}
{{- end -}}
{{- if and (eq .Values.models.type "existingClaim") (not .Values.models.existingClaim) -}}
{{- fail "models.type=existingClaim needs models.existingClaim: the name of a ReadWriteMany PersistentVolumeClaim" -}}
{{- end -}}
{{- if not (has (include "voxbox.prune" .) (list "off" "local" "shared-grace")) -}}
{{- fail (printf "models.prune=%q must be off, local or shared-grace" .Values.models.prune) -}}
{{- end -}}
{{- if and (eq .Values.models.type "existingClaim") (eq (include "voxbox.prune" .) "local") -}}
{{- fail "models.prune=local relies on flock, which network volumes (NFS, EFS) do not guarantee: use shared-grace or off with an existing claim" -}}
{{- end -}}
{{- if not (has .Values.autoscaling.type (list "hpa" "keda")) -}}
{{- fail (printf "autoscaling.type=%q must be hpa or keda" .Values.autoscaling.type) -}}
{{- end -}}
{{- if and .Values.worker.gunicornThreads .Values.worker.queueSize -}}
{{- $ws := int .Values.worker.wsMaxConnections -}}
{{- if eq $ws 0 -}}{{- $ws = max 1 (div (int .Values.worker.gunicornThreads) 8) -}}{{- end -}}
{{- $batch := 1 -}}
{{- if ne (toString .Values.worker.maxBatch) "auto" -}}{{- $batch = int .Values.worker.maxBatch -}}{{- end -}}
{{- $need := add (int .Values.worker.queueSize) $batch $ws 4 -}}
{{- if lt (int .Values.worker.gunicornThreads) (int $need) -}}
{{- fail (printf "worker.gunicornThreads=%v is too few: the worker needs queueSize (%v) + batch (%v) + WebSockets (%v) + 4 = %v threads; raise it or lower worker.queueSize / worker.wsMaxConnections" .Values.worker.gunicornThreads .Values.worker.queueSize $batch $ws $need) -}}
{{- end -}}
{{- end -}}
{{- end -}}
