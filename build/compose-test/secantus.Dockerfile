# The MongoDB-wire-compatible test server SecantusDB (secantusd-rs, GPL: a test tool, never part of
# Herald's image), standing in for mongo:7 where no registry can be reached
# (build/compose-up-test.sh copies the binary the test suite already uses into the context).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY secantusd-rs /usr/local/bin/secantusd-rs
RUN mkdir -p /data/db
VOLUME /data/db
EXPOSE 27017
CMD ["secantusd-rs", "--host", "0.0.0.0", "--port", "27017", "--storage-path", "/data/db"]
