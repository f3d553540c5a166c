{{- define "zonemesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "zonemesh.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "zonemesh.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zonemesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Comma-separated etcd client endpoints (host:port). */}}
{{- define "zonemesh.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $full := include "zonemesh.fullname" . -}}
{{- $eps := list -}}
{{- range $i, $_ := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "%s-etcd-%d.%s-etcd-headless.%s.svc:2379" $full $i $full $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- join "," .Values.etcd.endpoints -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by every zonemesh container: how to reach etcd. */}}
{{- define "zonemesh.etcdEnv" -}}
- name: ZONEMESH_ETCD_ENDPOINTS
  value: {{ include "zonemesh.etcdEndpoints" . | quote }}
- name: ZONEMESH_PREFIX
  value: {{ .Values.prefix | quote }}
{{- if .Values.etcd.tls.secretName }}
- name: ZONEMESH_ETCD_CA
  value: /etc/zonemesh/etcd-tls/ca.crt
- name: ZONEMESH_ETCD_CERT
  value: /etc/zonemesh/etcd-tls/tls.crt
- name: ZONEMESH_ETCD_KEY
  value: /etc/zonemesh/etcd-tls/tls.key
{{- end }}
{{- if .Values.etcd.auth.secretName }}
- name: ZONEMESH_ETCD_USERNAME
  valueFrom: {secretKeyRef: {name: {{ .Values.etcd.auth.secretName }}, key: username}}
- name: ZONEMESH_ETCD_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .Values.etcd.auth.secretName }}, key: password}}
{{- end }}
{{- end -}}

{{- define "zonemesh.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "zonemesh.podSecurity" -}}
{{ toYaml .Values.securityContext }}
{{- end -}}

{{- define "zonemesh.tokenSecret" -}}
{{- .Values.control.tokenSecret | default (printf "%s-control-token" (include "zonemesh.fullname" .)) -}}
{{- end -}}
